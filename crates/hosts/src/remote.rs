//! The shell scripts the SSH driver runs on a host, as pure functions of names and paths, so that their quoting
//! is tested without a host. The layout under the host's `dir`:
//!
//! - `releases/VERSION/`: a shipped release (appears at once, by rename); `releases/.incoming-*`: one arriving.
//! - `run/SERVICE-ID.TOKEN.{sh,pid,exit}`: one launch of an instance: its script, its process id, and its exit
//!   status once it has exited (written by the small wrapper that waits for it, renamed into place).
//! - `logs/SERVICE-ID.log`: the instance's output, appended across restarts.
//! - `jobs/JOB.pgid`: the process group of a scheduled job's run on the host (see [`job_script`]).
//!
//! Instances are started with `setsid` under a wrapper `sh`, so that they outlive the SSH session; the wrapper
//! records the exit status, which is how the driver learns of a crash (it polls, over the one connection).

/// `s` quoted for a POSIX shell.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A host directory as a shell word: `~` and `~/...` become `"$HOME"...`.
pub fn dir_word(dir: &str) -> String {
    match dir.strip_prefix('~') {
        Some("") => "\"$HOME\"".into(),
        Some(rest) if rest.starts_with('/') => format!("\"$HOME\"{}", quote(rest)),
        _ => quote(dir),
    }
}

/// The run name of an instance: `SERVICE-ID` (what `NONSTOP_INSTANCE` holds).
pub fn instance_name(service: &str, instance: u64) -> String {
    format!("{service}-{instance}")
}

/// The script file an instance runs: into its directory, its environment, then `exec` of the command (so the
/// recorded process id is the app's).
pub fn instance_script(workdir: &str, env: &[(String, String)], command: &str) -> String {
    let mut s = format!("cd {} || exit 126\n", dir_word(workdir));
    for (k, v) in env {
        s.push_str(&format!("export {k}={}\n", quote(v)));
    }
    s.push_str(&format!("exec {command}\n"));
    s
}

/// Kills what earlier launches of `service`'s instances left running (of instance `only`, or of all), and
/// removes their files. A process is killed only if its environment says it is that instance, so that a reused
/// process id is never hit, nor an instance of a service whose name merely starts the same.
fn kill_leftovers(base: &str, service: &str, only: Option<u64>) -> String {
    let glob = match only {
        Some(id) => format!("{}-{id}", quote(service)),
        None => format!("{}-*", quote(service)),
    };
    format!(
        "for f in {base}/run/{glob}.*.pid; do [ -e \"$f\" ] || continue; n=${{f##*/}}; n=${{n%.*.pid}}; \
         case \"${{n#{svc}-}}\" in ''|*[!0-9]*) continue;; esac; p=$(cat \"$f\"); \
         if [ -n \"$p\" ] && grep -qzxF \"NONSTOP_INSTANCE=$n\" /proc/\"$p\"/environ 2>/dev/null; then kill -KILL \"$p\" 2>/dev/null || true; fi; \
         rm -f \"${{f%.pid}}\".*; done",
        svc = quote(service),
    )
}

/// Starts an instance (its script arrives on standard input) and prints its process id. A leftover of the same
/// instance (a proxy that died, a lost connection) is killed first, so it frees its port.
pub fn launch(dir: &str, service: &str, instance: u64, token: &str) -> String {
    let base = dir_word(dir);
    let name = instance_name(service, instance);
    let run = format!("{base}/run/{}", quote(&format!("{name}.{token}")));
    format!(
        "set -e\nmkdir -p {base}/run {base}/logs\n{}\ncat > {run}.sh\n\
         setsid sh -c 'sh \"$1.sh\" & echo $! > \"$1.pid.tmp\"; mv \"$1.pid.tmp\" \"$1.pid\"; wait $!; echo $? > \"$1.exit.tmp\"; mv \"$1.exit.tmp\" \"$1.exit\"' \
         nonstop-instance {run} < /dev/null >> {base}/logs/{log} 2>&1 &\n\
         n=0; while [ ! -s {run}.pid ]; do n=$((n+1)); if [ $n -gt 200 ]; then echo 'the instance did not start within 10 s' >&2; exit 1; fi; sleep 0.05; done\n\
         cat {run}.pid\n",
        kill_leftovers(&base, service, Some(instance)),
        log = quote(&format!("{name}.log")),
    )
}

/// Kills every leftover instance of `service` (when the driver first reaches the host).
pub fn clean(dir: &str, service: &str) -> String {
    let base = dir_word(dir);
    format!("mkdir -p {base}/run {base}/logs\n{}\n", kill_leftovers(&base, service, None))
}

/// Prints `RUN STATUS` for each run (`NAME.TOKEN`) that has exited, and `RUN gone` for one whose process is gone
/// with no status recorded (its wrapper was killed too, or is about to write it).
pub fn poll(dir: &str, runs: &[String]) -> String {
    let base = dir_word(dir);
    let list: Vec<String> = runs.iter().map(|r| quote(r)).collect();
    format!(
        "cd {base}/run 2>/dev/null || exit 0; for r in {}; do if [ -e \"$r.exit\" ]; then echo \"$r $(cat \"$r.exit\")\"; \
         elif [ -s \"$r.pid\" ] && ! kill -0 \"$(cat \"$r.pid\")\" 2>/dev/null; then echo \"$r gone\"; fi; done; true",
        list.join(" ")
    )
}

/// One line of [`poll`]'s output: the run, and its exit status (`None`: gone without one).
pub fn parse_poll(line: &str) -> Option<(String, Option<i32>)> {
    let (run, what) = line.trim().split_once(' ')?;
    match what {
        "gone" => Some((run.to_string(), None)),
        s => Some((run.to_string(), Some(s.trim().parse().ok()?))),
    }
}

/// How an exit status the wrapper recorded reads (the shell's 128 + n for a signal).
pub fn describe_exit(status: Option<i32>) -> String {
    match status {
        Some(s) if s > 128 && s < 160 => format!("exit status {s} (killed by signal {})", s - 128),
        Some(s) => format!("exit status {s}"),
        None => "the process is gone and left no exit status".into(),
    }
}

/// Sends a signal to a launched instance.
pub fn signal(pid: u32, signal: &str) -> String {
    format!("kill -{signal} {pid} 2>/dev/null || true")
}

/// Whether a release of `version` is in place: prints `yes` or `no`.
pub fn has_release(dir: &str, version: &str) -> String {
    format!("if [ -d {}/releases/{} ]; then echo yes; else echo no; fi", dir_word(dir), quote(version))
}

/// Receives a release as a tar archive on standard input, checks its SHA-256, unpacks it beside the others and
/// renames it into place (`releases/VERSION` appears whole or not at all). Prints `shipped`, or `present` when a
/// concurrent ship won.
pub fn receive_release(dir: &str, version: &str, sha256_hex: &str) -> String {
    let base = dir_word(dir);
    let v = quote(version);
    format!(
        "set -e\nr={base}/releases\nmkdir -p \"$r\"\nt=\"$r/.incoming-{version}-$$\"\nrm -rf \"$t\" \"$t.tar\"\nmkdir \"$t\"\n\
         cat > \"$t.tar\"\n\
         if ! printf '%s  %s\\n' {sum} \"$t.tar\" | sha256sum -c --status; then rm -rf \"$t\" \"$t.tar\"; \
         echo 'SHA-256 mismatch: the release arrived damaged' >&2; exit 3; fi\n\
         tar -xf \"$t.tar\" -C \"$t\"\nrm -f \"$t.tar\"\n\
         if [ -d \"$r/\"{v} ]; then rm -rf \"$t\"; echo present; else mv -T \"$t\" \"$r/\"{v}; echo shipped; fi\n",
        sum = quote(sha256_hex),
    )
}

/// Removes the oldest releases past `keep`, never `serving` or `previous`.
pub fn prune_releases(dir: &str, keep: u32, serving: &str, previous: &str) -> String {
    let others = keep.saturating_sub(2) + 1;
    format!(
        "cd {}/releases 2>/dev/null || exit 0; ls -1t | grep -v -x -F -e {} -e {} | tail -n +{others} | \
         while read -r d; do rm -rf -- \"$d\"; done; true",
        dir_word(dir),
        quote(serving),
        quote(previous)
    )
}

/// The last `bytes_max` bytes of an instance's log.
pub fn log_tail(dir: &str, name: &str, bytes_max: u64) -> String {
    format!("tail -c {bytes_max} {}/logs/{}.log", dir_word(dir), quote(name))
}

/// The working directory of an instance: its release, or the host's dir when nothing is shipped.
pub fn workdir(dir: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("{}/releases/{v}", dir.trim_end_matches('/')),
        None => dir.to_string(),
    }
}

/// The first line a job's script prints: the process group of the run, for [`job_signal`].
pub const JOB_PGID_MARK: &str = "@@nonstop-pgid ";

/// The script of one run of a scheduled job on a host, read by `sh -s` from standard input (so that the values
/// of `env`, secrets among them, never show in a process list). It first kills what an earlier run of the job
/// left running (a cut link, a killed `nonstop serve`): only a process group whose leader's environment says
/// `NONSTOP_JOB=job`. Then it runs `command` with `sh -c` in `workdir`, in a session of its own (`setsid`), its
/// output merged, after printing [`JOB_PGID_MARK`] and the group's id. Exit status 125: the run could not start.
pub fn job_script(dir: &str, job: &str, workdir: &str, env: &[(String, String)], command: &str) -> String {
    let base = dir_word(dir);
    let mut s = format!(
        "mkdir -p {base}/jobs || exit 125\nf={base}/jobs/{file}\n\
         if [ -s \"$f\" ]; then o=$(cat \"$f\"); if [ -n \"$o\" ] && grep -qzxF {mark} /proc/\"$o\"/environ 2>/dev/null; then \
         echo \"[nonstop: an earlier run of this job is still running (process group $o): killing it]\"; \
         kill -KILL -\"$o\" 2>/dev/null || true; fi; fi\n\
         cd {wd} || {{ echo {nodir}; exit 125; }}\nexport NONSTOP_JOB={jobq}\n",
        file = quote(&format!("{job}.pgid")),
        mark = quote(&format!("NONSTOP_JOB={job}")),
        wd = dir_word(workdir),
        nodir = quote(&format!("[nonstop: cannot enter {workdir} on this host]")),
        jobq = quote(job),
    );
    for (k, v) in env {
        s.push_str(&format!("export {k}={}\n", quote(v)));
    }
    s.push_str(&format!(
        "exec setsid -w sh -c 'echo $$ > \"$1\"; echo \"{JOB_PGID_MARK}$$\"; exec sh -c \"$2\"' nonstop-job \"$f\" {} \
         < /dev/null 2>&1\n",
        quote(command)
    ));
    s
}

/// Sends `signal` to the process group of a job's run; with `forget`, also removes its record (the run ended).
pub fn job_signal(dir: &str, job: &str, pgid: u32, signal: &str, forget: bool) -> String {
    let mut s = format!("kill -{signal} -{pgid} 2>/dev/null; true");
    if forget {
        let f = format!("{}/jobs/{}", dir_word(dir), quote(&format!("{job}.pgid")));
        s.push_str(&format!("; if [ \"$(cat {f} 2>/dev/null)\" = {pgid} ]; then rm -f {f}; fi"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(script: &str, stdin: &str) -> (i32, String, String) {
        use std::io::Write;
        let mut c = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let o = c.wait_with_output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into(),
            String::from_utf8_lossy(&o.stderr).into(),
        )
    }

    #[test]
    fn words_are_quoted_and_home_is_expanded() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(dir_word("~/nonstop"), "\"$HOME\"'/nonstop'");
        assert_eq!(dir_word("~"), "\"$HOME\"");
        assert_eq!(dir_word("/srv/a b"), "'/srv/a b'");
        assert_eq!(dir_word("~other/x"), "'~other/x'");
        let (_, out, _) = sh(&format!("HOME=/h; echo {}", dir_word("~/a 'b'")), "");
        assert_eq!(out, "/h/a 'b'\n");
    }

    #[test]
    fn the_instance_script_exports_env_quoted_and_execs() {
        let s = instance_script("/srv/r", &[("A".into(), "x y'z".into())], "printf '%s|%s' \"$A\" \"$PWD\"");
        let (code, out, _) = sh(&s.replace("/srv/r", "/"), "");
        assert_eq!(code, 0);
        assert_eq!(out, "x y'z|/");
    }

    #[test]
    fn a_release_is_received_checked_and_renamed_and_a_damaged_one_is_refused() {
        let d = std::env::temp_dir().join(format!("nonstop-remote-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("src")).unwrap();
        std::fs::write(d.join("src/app"), "binary").unwrap();
        let tar = Command::new("tar").arg("-cf").arg(d.join("r.tar")).arg("-C").arg(d.join("src")).arg(".").status();
        assert!(tar.unwrap().success());
        let bytes = std::fs::read(d.join("r.tar")).unwrap();
        let sum = Command::new("sha256sum").arg(d.join("r.tar")).output().unwrap();
        let sum = String::from_utf8_lossy(&sum.stdout).split_whitespace().next().unwrap().to_string();
        let host = d.join("host").display().to_string();
        let run = |sum: &str, body: &[u8]| {
            use std::io::Write;
            let mut c = Command::new("sh")
                .arg("-c")
                .arg(receive_release(&host, "v1", sum))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            c.stdin.take().unwrap().write_all(body).unwrap();
            c.wait_with_output().unwrap()
        };
        let bad = run(&sum, &bytes[..bytes.len() - 1]);
        assert_eq!(bad.status.code(), Some(3));
        assert!(String::from_utf8_lossy(&bad.stderr).contains("SHA-256 mismatch"));
        assert!(!d.join("host/releases/v1").exists());
        assert_eq!(std::fs::read_dir(d.join("host/releases")).unwrap().count(), 0, "nothing left of it");
        let (_, out, _) = sh(&has_release(&host, "v1"), "");
        assert_eq!(out, "no\n");
        let good = run(&sum, &bytes);
        assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
        assert_eq!(String::from_utf8_lossy(&good.stdout), "shipped\n");
        assert_eq!(std::fs::read_to_string(d.join("host/releases/v1/app")).unwrap(), "binary");
        let (_, out, _) = sh(&has_release(&host, "v1"), "");
        assert_eq!(out, "yes\n");
        assert_eq!(String::from_utf8_lossy(&run(&sum, &bytes).stdout), "present\n");

        // Pruning keeps `keep` releases, always the serving and the previous one, the newest others.
        for v in ["v2", "v3", "v4", "v5"] {
            std::fs::create_dir_all(d.join("host/releases").join(v)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let (code, _, err) = sh(&prune_releases(&host, 3, "v5", "v1"), "");
        assert_eq!(code, 0, "{err}");
        let mut left: Vec<String> = std::fs::read_dir(d.join("host/releases"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["v1", "v4", "v5"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_instance_outlives_its_launcher_and_its_exit_is_polled_and_a_leftover_is_killed() {
        let d = std::env::temp_dir().join(format!("nonstop-launch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let dir = d.display().to_string();
        let script = instance_script("/", &[("NONSTOP_INSTANCE".into(), "web-1".into())], "sleep 30");
        let (code, pid, err) = sh(&launch(&dir, "web", 1, "t1"), &script);
        assert_eq!(code, 0, "{err}");
        let pid: u32 = pid.trim().parse().unwrap();
        let runs = vec!["web-1.t1".to_string()];
        assert_eq!(sh(&poll(&dir, &runs), "").1, "", "running");
        // A second launch of the same instance kills the first (a leftover).
        let (code, pid2, err) = sh(&launch(&dir, "web", 1, "t2"), &script);
        assert_eq!(code, 0, "{err}");
        let pid2: u32 = pid2.trim().parse().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
        {
            assert!(std::time::Instant::now() < deadline, "the leftover {pid} was not killed");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        sh(&signal(pid2, "TERM"), "");
        let runs = vec!["web-1.t2".to_string()];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let line = loop {
            let out = sh(&poll(&dir, &runs), "").1;
            if let Some(l) = out.lines().find_map(parse_poll).filter(|(_, s)| s.is_some()) {
                break l;
            }
            assert!(std::time::Instant::now() < deadline, "no exit recorded: {out:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(line, ("web-1.t2".to_string(), Some(143)));
        assert_eq!(describe_exit(line.1), "exit status 143 (killed by signal 15)");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_job_script_runs_its_command_in_a_group_of_its_own_and_kills_a_leftover_of_the_job() {
        use std::io::{BufRead, Write};
        let d = std::env::temp_dir().join(format!("nonstop-job-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("work")).unwrap();
        let dir = d.display().to_string();
        let work = d.join("work").display().to_string();
        let env = [("A".to_string(), "it's x".to_string())];
        let script =
            job_script(&dir, "nightly", &work, &env, "pwd; echo \"a=$A job=$NONSTOP_JOB\"; echo oops >&2; exit 3");
        let (code, out, _) = sh("sh -s", &script);
        assert_eq!(code, 3, "{out}");
        let lines: Vec<&str> = out.lines().collect();
        let pgid: u32 =
            lines[0].strip_prefix(JOB_PGID_MARK).and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{out}"));
        assert!(pgid > 1);
        assert_eq!(&lines[1..], [work.as_str(), "a=it's x job=nightly", "oops"], "{out}");
        assert_eq!(std::fs::read_to_string(d.join("jobs/nightly.pgid")).unwrap().trim(), pgid.to_string());
        sh(&job_signal(&dir, "nightly", pgid, "KILL", true), "");
        assert!(!d.join("jobs/nightly.pgid").exists(), "the record of an ended run is removed");

        // A run left going (its link was cut): the next run of the same job kills its whole group first.
        let mut first = Command::new("sh")
            .arg("-s")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let long = job_script(&dir, "nightly", &work, &[], "sleep 30 & sleep 30");
        first.stdin.take().unwrap().write_all(long.as_bytes()).unwrap();
        let mut head = String::new();
        std::io::BufReader::new(first.stdout.take().unwrap()).read_line(&mut head).unwrap();
        let old: u32 =
            head.trim().strip_prefix(JOB_PGID_MARK).and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{head}"));
        // Another job's run is not touched.
        let other = job_script(&dir, "other", &work, &[], "true");
        assert_eq!(sh("sh -s", &other).0, 0);
        let (code, out, _) = sh("sh -s", &job_script(&dir, "nightly", &work, &[], "echo second"));
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(&format!("still running (process group {old}): killing it")), "{out}");
        let status = first.wait().unwrap();
        assert!(!status.success(), "the leftover run was killed: {status:?}");
        let members = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
            .filter(|st| st.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').nth(2)) == Some(&old.to_string()))
            .filter(|st| !st.contains(") Z "))
            .count();
        assert_eq!(members, 0, "nothing of the leftover group {old} is left");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn poll_lines_parse() {
        assert_eq!(parse_poll("web-1.abc 0\n"), Some(("web-1.abc".into(), Some(0))));
        assert_eq!(parse_poll("web-1.abc gone"), Some(("web-1.abc".into(), None)));
        assert_eq!(parse_poll("garbage"), None);
        assert_eq!(describe_exit(None), "the process is gone and left no exit status");
        assert_eq!(workdir("~/nonstop/", Some("v2")), "~/nonstop/releases/v2");
    }
}
