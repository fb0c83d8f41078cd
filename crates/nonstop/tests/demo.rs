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
    // The whole run's timeline charts, each phase's start and events marked on every one.
    let chart = |dom: &str, id: &str| -> String {
        let after = dom.split(&format!("id=\"{id}\"")).nth(1).unwrap_or_else(|| panic!("chart {id} in {dom}"));
        after.split("</svg>").next().unwrap().to_string()
    };
    for id in ["throughput", "latency", "headers"] {
        let c = chart(&dom, id);
        for phase in ["1. steady v1", "2. rolling deploy to v2", "3. kill -9 one instance", "5. broken v3 rolled back"]
        {
            assert!(c.contains(phase), "{id} marks the start of {phase:?}");
        }
        assert!(c.contains("deploy of v2 starts") && c.contains("kill -9 of instance"), "{id} marks the events");
    }
    assert!(chart(&dom, "throughput").matches("class=\"bar\"").count() > 30, "bars over the whole run");
    assert!(chart(&dom, "headers").contains("v1") && chart(&dom, "headers").contains("v2"), "versions over time");

    // Each phase's page: its name, a link back to the summary, and its events on its charts.
    let phase2 = headless(&dir, &["--dump-dom"], &out_dir.join("phase-2.html"));
    let phase2 = String::from_utf8_lossy(&phase2.stdout);
    assert!(phase2.contains("<h1>nonstop demo, phase 2 of 5: rolling deploy to v2</h1>"), "{phase2}");
    assert!(phase2.contains("id=\"back\" href=\"report.html\""), "{phase2}");
    let by_step = phase2.split("id=\"by-step\"").nth(1).unwrap_or_else(|| panic!("the flow and step table: {phase2}"));
    assert!(by_step.contains("POST /orders") && by_step.contains("<th>read</th>"), "{by_step}");
    let marks = chart(&phase2, "throughput");
    for event in ["deploy of v2 starts", "a v2 instance takes traffic", "an old instance drained"] {
        assert!(marks.contains(event), "{event:?} marked in phase 2: {marks}");
    }
    // Its end may come after the load's last second: it is listed with the events in any case.
    let events = phase2.split("id=\"marks\"").nth(1).unwrap_or_else(|| panic!("the events table: {phase2}"));
    assert!(events.contains("deploy of v2: succeeded"), "{events}");
    let page = |n: u32| std::fs::read_to_string(out_dir.join(format!("phase-{n}.html"))).unwrap();
    assert!(page(3).contains("class=\"mark\"") && page(3).contains("kill -9 of instance"), "{}", page(3));
    assert!(page(5).contains("rolled back") && page(5).contains("deploy of v3: rolled_back"), "{}", page(5));
    for n in [1, 4] {
        assert!(page(n).contains(&format!("phase {n} of 5")) && page(n).contains("href=\"report.html\""));
    }
}
