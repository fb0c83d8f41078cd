//! `nonstop demo`, the README's main job, run as a user would: it must exit 0 (no failed request, every accepted
//! order stored exactly once), print its verdict, and write an HTML report that renders in headless Chromium.

use std::path::Path;
use std::process::Command;

use nonstop_testkit::{headless, TempDir};

#[test]
fn demo_exits_0_with_a_verdict_and_a_report() {
    let dir = TempDir::new("demo");
    let out_dir = dir.path().join("out");
    // A port range of its own (below the ephemeral range) for the demo's instances.
    let base = 20_000 + (std::process::id() % 20) * 40;
    let out = Command::new(Path::new(env!("CARGO_BIN_EXE_nonstop")))
        .args(["demo", "--out"])
        .arg(&out_dir)
        .args(["--ports", &format!("{base}-{}", base + 39)])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run nonstop demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "the demo passes");
    for phase in
        ["steady v1", "rolling deploy to v2", "kill -9 one instance", "burst 3x capacity", "broken v3 rolled back"]
    {
        assert!(stdout.contains(phase), "phase {phase:?} in the verdict");
    }
    assert!(stdout.contains("PASS: "), "{stdout}");
    assert!(stdout.contains("app now serves v2") && stdout.contains("rolled back to v2"), "{stdout}");
    let line = stdout.lines().find(|l| l.contains("orders accepted (201)")).expect("the orders line");
    let numbers: Vec<u64> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    assert_eq!(numbers.len(), 3, "{line}");
    assert!(numbers[1] > 0 && numbers[1] == numbers[2], "orders accepted equal rows stored: {line}");

    let page = out_dir.join("report.html");
    let dom = headless(&dir, &["--dump-dom"], &page);
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("id=\"verdict\" class=\"ok\""), "the verdict renders as a pass: {dom}");
    assert_eq!(dom.matches("<tr>").count(), 6, "a header and five phases");
    for n in 1..=5 {
        assert!(dom.contains(&format!("href=\"phase-{n}.html\"")), "phase {n} links its report");
        assert!(out_dir.join(format!("phase-{n}.html")).exists());
    }
}
