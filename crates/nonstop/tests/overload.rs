//! Overload with zero tuning. First the controller alone: the adaptive limit (`nonstop-limit`) and the admission
//! decision (`nonstop_proxy::admission`) drive simulated Tomcat-like servers (workers, an accept queue, a 503 past
//! both), one millisecond at a time, through the traces of the issue: steady load, a step to 4× overload, a
//! server that stalls, servers of 2 and 8 workers, and a new version twice as slow. Then the real thing: `nonstop
//! serve` with default settings in front of real `nonstop app` servers, under an open-model load from `nonstop
//! load`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nonstop_limit::{Limiter, Outcome, Settings, Why};
use nonstop_proxy::admission::{admit, Admit, QueueView};

/// A simulated server that overloads like Tomcat (and `nonstop app`): `workers` requests run, `accept_queue` more
/// wait, and past both a request is refused at once with 503.
struct SimServer {
    workers: usize,
    accept_queue: usize,
    /// Work per request, milliseconds, by time.
    service_ms: Box<dyn Fn(u64) -> u64>,
    /// Whether the server is frozen at a time.
    stalled: Box<dyn Fn(u64) -> bool>,
    /// (request id, sent at, work left in ms).
    running: Vec<(u64, u64, u64)>,
    waiting: VecDeque<(u64, u64)>,
    limiter: Limiter,
    /// Requests sent and not answered.
    pending: u32,
    served: u64,
    refused: u64,
    /// The limit every 100 ms.
    limits: Vec<u32>,
}

impl SimServer {
    fn new(workers: usize, accept_queue: usize, service_ms: u64, t0: Instant) -> SimServer {
        SimServer {
            workers,
            accept_queue,
            service_ms: Box::new(move |_| service_ms),
            stalled: Box::new(|_| false),
            running: Vec::new(),
            waiting: VecDeque::new(),
            limiter: Limiter::new(Settings::default(), t0),
            pending: 0,
            served: 0,
            refused: 0,
            limits: Vec::new(),
        }
    }

    fn capacity_per_s(&self, at_ms: u64) -> f64 {
        self.workers as f64 * 1000.0 / (self.service_ms)(at_ms) as f64
    }
}

/// How the proxy limits each server.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Adaptive,
    Fixed(u32),
}

struct Run {
    /// Successful answers per second, over the measured span.
    goodput: f64,
    /// Requests answered 503 by the proxy (shed or timed out in its queue).
    shed: u64,
    /// Requests that timed out in the proxy's queue (shed late).
    queue_timeouts: u64,
    /// Refusals by the servers (each went back to the proxy's queue).
    refused: u64,
    /// Requests that were sent and did succeed, but took longer than 3 s.
    slow: u64,
    servers: Vec<SimServer>,
}

/// Runs `servers` behind the simulated proxy for `duration_ms`, with `rate(t)` requests per second arriving, and
/// measures goodput from `measure_from_ms` on.
fn run(
    mut servers: Vec<SimServer>,
    mode: Mode,
    rate: impl Fn(u64) -> f64,
    duration_ms: u64,
    measure_from_ms: u64,
) -> Run {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let (wait_max, overload_wait_max) = (Duration::from_secs(10), Duration::from_secs(1));
    // (request id, arrived at, wait limit)
    let mut queue: VecDeque<(u64, u64, u64)> = VecDeque::new();
    let mut next_id = 0u64;
    let mut owed = 0.0f64;
    let (mut good, mut shed, mut queue_timeouts, mut slow) = (0u64, 0u64, 0u64, 0u64);
    // Arrival times of requests, for the ones that come back refused.
    let mut arrived: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut arrivals: VecDeque<u64> = VecDeque::new();
    let mut rr = 0usize;
    let limit_of = |s: &SimServer| match mode {
        Mode::Adaptive => s.limiter.effective(),
        Mode::Fixed(n) => n,
    };
    for t in 0..duration_ms {
        // Servers work for one millisecond.
        for s in servers.iter_mut() {
            if (s.stalled)(t) {
                continue;
            }
            let mut done = Vec::new();
            s.running.retain_mut(|r| {
                r.2 = r.2.saturating_sub(1);
                if r.2 == 0 {
                    done.push((r.0, r.1));
                    false
                } else {
                    true
                }
            });
            for (id, sent) in done {
                let latency = Duration::from_millis(t + 1 - sent);
                s.limiter.on_answer(at(t + 1), latency, s.pending, Outcome::Answered);
                s.pending -= 1;
                s.served += 1;
                let came = arrived.remove(&id).expect("each request answered once");
                if t + 1 - came > 3_000 {
                    slow += 1;
                }
                if t >= measure_from_ms {
                    good += 1;
                }
            }
            while s.running.len() < s.workers {
                let Some((id, sent)) = s.waiting.pop_front() else { break };
                s.running.push((id, sent, (s.service_ms)(t)));
            }
        }
        // Arrivals, each judged by the admission decision.
        owed += rate(t) / 1000.0;
        while owed >= 1.0 {
            owed -= 1.0;
            arrivals.push_back(t);
            while arrivals.front().is_some_and(|&a| a + 2_000 <= t) {
                arrivals.pop_front();
            }
            let full = servers.iter().all(|s| s.pending >= limit_of(s));
            let slots: u64 = if full { servers.iter().map(|s| u64::from(limit_of(s))).sum() } else { 0 };
            let latency_ms = servers.iter().map(|s| (s.service_ms)(t) as f64).sum::<f64>() / servers.len() as f64;
            let view = QueueView {
                queued: queue.len(),
                queue_length_max: 4096,
                wait_max,
                overload_wait_max,
                deadline_left: Duration::from_secs(30),
                slots,
                latency: Duration::from_secs_f64(latency_ms * (1.0 + 0.5 * f64::from(u8::from(full))) / 1000.0),
                arrival_rate: arrivals.len() as f64 / 2.0,
                after_outage: false,
            };
            let id = next_id;
            next_id += 1;
            if queue.is_empty() && !full {
                queue.push_back((id, t, t + wait_max.as_millis() as u64));
                arrived.insert(id, t);
                continue;
            }
            match admit(&view) {
                Admit::Wait(limit) => {
                    queue.push_back((id, t, t + limit.as_millis() as u64));
                    arrived.insert(id, t);
                }
                Admit::Shed(_) => shed += 1,
            }
        }
        // The proxy's queue: time-outs, then dispatch to the server with the most room under its limit.
        while queue.front().is_some_and(|q| q.2 <= t) {
            let (id, ..) = queue.pop_front().expect("checked");
            arrived.remove(&id);
            shed += 1;
            queue_timeouts += 1;
        }
        while let Some(&(id, came, until)) = queue.front() {
            // Round robin over the servers with room under their limit, as the proxy's default balancer does.
            let n = servers.len();
            let best = (0..n).map(|k| (rr + k) % n).find(|&i| servers[i].pending < limit_of(&servers[i]));
            rr = (rr + 1) % n;
            let Some(i) = best else { break };
            queue.pop_front();
            let s = &mut servers[i];
            s.pending += 1;
            if s.running.len() < s.workers && !(s.stalled)(t) {
                let work = (s.service_ms)(t);
                s.running.push((id, t, work));
            } else if s.running.len() + s.waiting.len() < s.workers + s.accept_queue {
                s.waiting.push_back((id, t));
            } else {
                // Refused at once: an overload answer, and the request goes back to the head of the queue.
                s.limiter.on_answer(at(t), Duration::from_micros(300), s.pending, Outcome::Overload);
                s.pending -= 1;
                s.refused += 1;
                queue.push_front((id, came, until));
                break;
            }
        }
        if t % 50 == 0 {
            for s in servers.iter_mut() {
                s.limiter.on_tick(at(t), s.pending);
            }
        }
        if t % 100 == 0 {
            for s in servers.iter_mut() {
                let l = limit_of(s);
                s.limits.push(l);
            }
        }
    }
    let refused = servers.iter().map(|s| s.refused).sum();
    let span_s = (duration_ms - measure_from_ms) as f64 / 1000.0;
    Run { goodput: good as f64 / span_s, shed, queue_timeouts, refused, slow, servers }
}

fn tomcat_pair(t0: Instant) -> Vec<SimServer> {
    vec![SimServer::new(2, 10, 20, t0), SimServer::new(2, 10, 20, t0)]
}

#[test]
fn steady_load_below_capacity_is_all_served_without_refusals() {
    let t0 = Instant::now();
    let r = run(tomcat_pair(t0), Mode::Adaptive, |_| 120.0, 10_000, 1_000);
    assert_eq!((r.shed, r.refused, r.slow), (0, 0, 0));
    assert!((r.goodput - 120.0).abs() < 3.0, "goodput {}", r.goodput);
    for s in &r.servers {
        assert!(s.limiter.limit() >= 2, "a limit below the demand would queue for nothing: {:?}", s.limiter.view());
    }
}

#[test]
fn a_step_to_4x_overload_keeps_the_servers_full_and_sheds_the_rest_early() {
    let t0 = Instant::now();
    let step = |t: u64| if t < 2_000 { 100.0 } else { 800.0 };
    let capacity: f64 = tomcat_pair(t0).iter().map(|s| s.capacity_per_s(0)).sum();
    let tuned = run(tomcat_pair(t0), Mode::Fixed(2), step, 12_000, 3_000);
    let adaptive = run(tomcat_pair(t0), Mode::Adaptive, step, 12_000, 3_000);
    let untuned = run(tomcat_pair(t0), Mode::Fixed(256), step, 12_000, 3_000);
    eprintln!(
        "capacity {capacity}/s; goodput: hand-tuned {:.1}/s, adaptive {:.1}/s, 256 in flight {:.1}/s; refusals {} {} {}",
        tuned.goodput, adaptive.goodput, untuned.goodput, tuned.refused, adaptive.refused, untuned.refused
    );
    assert!(adaptive.goodput >= 0.95 * tuned.goodput, "{} vs {}", adaptive.goodput, tuned.goodput);
    assert!(adaptive.goodput >= 0.95 * capacity);
    // The servers' own refusals stop once the limit is learned: a few at the step, none after.
    assert!(adaptive.refused < 50, "{} refusals", adaptive.refused);
    assert!(untuned.refused > 1_000, "a static limit past the servers' queues makes them refuse: {}", untuned.refused);
    // What cannot be served is shed on arrival, not after a wait in the queue.
    assert!(adaptive.shed > 3_000);
    assert!(
        adaptive.queue_timeouts * 100 < adaptive.shed,
        "{} of {} shed late",
        adaptive.queue_timeouts,
        adaptive.shed
    );
    for s in &adaptive.servers {
        let settled = &s.limits[40..];
        assert!(settled.iter().all(|&l| (2..=12).contains(&l)), "between the workers and their queue: {settled:?}");
    }
}

#[test]
fn a_server_that_stalls_loses_its_limit_within_2s_and_the_other_carries_the_load() {
    let t0 = Instant::now();
    let mut servers = tomcat_pair(t0);
    servers[1].stalled = Box::new(|t| (4_000..7_000).contains(&t));
    // 80 requests/s: under one server's capacity of 100/s.
    let r = run(servers, Mode::Adaptive, |_| 80.0, 10_000, 1_000);
    let stalled = &r.servers[1];
    // Samples every 100 ms: the stall starts at sample 40.
    let within_2s = &stalled.limits[41..60];
    assert!(within_2s.iter().any(|&l| l <= 1), "the stalled server's limit: {within_2s:?}");
    assert_eq!(
        (r.shed, r.queue_timeouts),
        (0, 0),
        "nothing fails while the other server has room; limits {:?}",
        &stalled.limits[38..50]
    );
    // The limit is not enforced until the server shows overload: the stalled server's full accept queue refuses
    // once (that request goes to the other server), then its limit holds.
    assert!(r.refused <= 3, "{} refusals", r.refused);
    assert!(stalled.limits[95..].iter().all(|&l| l >= 2), "back after the stall: {:?}", &stalled.limits[70..]);
    assert!(r.servers[0].served > stalled.served, "the healthy server took over");
}

#[test]
fn servers_of_2_and_8_workers_each_get_their_own_limit_and_are_both_kept_full() {
    let t0 = Instant::now();
    let servers = vec![SimServer::new(2, 10, 20, t0), SimServer::new(8, 10, 20, t0)];
    let capacity: f64 = servers.iter().map(|s| s.capacity_per_s(0)).sum();
    let r = run(servers, Mode::Adaptive, |_| 4.0 * 500.0, 10_000, 2_000);
    eprintln!(
        "capacity {capacity}/s, goodput {:.1}/s, limits {:?} and {:?}",
        r.goodput,
        r.servers[0].limiter.view(),
        r.servers[1].limiter.view()
    );
    assert!(r.goodput >= 0.9 * capacity, "{} of {capacity}", r.goodput);
    let (small, big) = (r.servers[0].limiter.limit(), r.servers[1].limiter.limit());
    assert!((2..=12).contains(&small) && (8..=18).contains(&big), "limits {small} and {big}");
    assert!(r.refused < 100, "{} refusals", r.refused);
}

#[test]
fn a_new_version_twice_as_slow_keeps_the_servers_full_at_its_own_pace() {
    let t0 = Instant::now();
    let mut servers = tomcat_pair(t0);
    for s in servers.iter_mut() {
        s.service_ms = Box::new(|t| if t < 4_000 { 20 } else { 40 });
    }
    // 4× the new capacity of 100/s.
    let r = run(servers, Mode::Adaptive, |_| 400.0, 12_000, 6_000);
    let capacity = 2.0 * 2.0 * 1000.0 / 40.0;
    eprintln!("goodput {:.1}/s of {capacity}/s; limits {:?}", r.goodput, r.servers[0].limits);
    assert!(r.goodput >= 0.95 * capacity, "{} of {capacity}", r.goodput);
    for s in &r.servers {
        assert!(s.limits[60..].iter().all(|&l| (2..=12).contains(&l)), "{:?}", &s.limits[40..]);
        assert_ne!(s.limiter.view().why, Why::Stalled);
    }
}

// The real thing: `nonstop serve` with `adaptive_limit = true` and nothing else tuned (no `server_in_flight_max`) in front of real Tomcat-like
// `nonstop app` servers.

mod real {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use nonstop_testkit::{get, Proc, TempDir};
    use serde_json::Value;

    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn bin() -> &'static Path {
        Path::new(env!("CARGO_BIN_EXE_nonstop"))
    }

    /// Two workers and ten waiting at most, 20 ms of work: about 100 requests/s each.
    fn tomcat(dir: &TempDir, name: &str) -> Proc {
        let db = format!("sqlite://{}", dir.path().join(format!("{name}.db")).display());
        let args = ["app", "--listen", "127.0.0.1:0", "--db", &db, "--workers", "2", "--accept-queue", "10"];
        let mut args: Vec<&str> = args.to_vec();
        args.extend(["--work-ms", "20", "--instance", name]);
        Proc::start(bin(), &args)
    }

    /// The proxy with its listeners, the two servers and `adaptive_limit = true`: no limit is tuned.
    fn proxy(dir: &TempDir, apps: &[&Proc]) -> (Proc, SocketAddr) {
        let servers: Vec<String> = apps.iter().map(|a| format!("{{ addr = \"{}\" }}", a.addr)).collect();
        let config = format!(
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\nservice = \"app\"\n\n\
             [services.app]\nservers = [{}]\n\n[services.app.admission]\nadaptive_limit = true\n",
            servers.join(", ")
        );
        let path = dir.path().join("nonstop.toml");
        std::fs::write(&path, config).unwrap();
        let p = Proc::start(bin(), &["serve", "--config", path.to_str().unwrap()]);
        let admin = p.addr_after("admin").expect("admin address in the banner");
        (p, admin)
    }

    /// `nonstop load` at `rate` for `secs`, its JSON report.
    fn load(dir: &TempDir, addr: SocketAddr, rate: u32, secs: u32) -> std::thread::JoinHandle<Value> {
        let json = dir.path().join(format!("load-{rate}-{secs}.json"));
        let mut cmd = Command::new(bin());
        cmd.arg("load").arg(format!("http://{addr}/")).args(["--rate", &rate.to_string()]);
        cmd.args(["--duration", &format!("{secs}s"), "--track-header", "Retry-After"]).arg("--json").arg(&json);
        std::thread::spawn(move || {
            let out = cmd.output().expect("run nonstop load");
            let text = std::fs::read_to_string(&json)
                .unwrap_or_else(|_| panic!("no JSON from nonstop load: {}", String::from_utf8_lossy(&out.stderr)));
            serde_json::from_str(&text).expect("valid JSON")
        })
    }

    async fn servers(admin: SocketAddr) -> Vec<Value> {
        let v = get(admin, "/services/app").await.json();
        v["servers"].as_array().cloned().unwrap_or_else(|| panic!("no servers in {v}"))
    }

    fn limit_of(servers: &[Value], addr: SocketAddr) -> (u64, String) {
        let s = servers.iter().find(|s| s["addr"] == addr.to_string()).expect("the server is listed");
        let l = &s["limit"];
        (l["current"].as_u64().unwrap_or_else(|| panic!("no learned limit in {s}")), l["why"].as_str().unwrap().into())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_the_adaptive_limit_a_4x_overload_keeps_the_servers_busy_and_every_failure_is_a_fast_503_with_retry_after(
    ) {
        let _one = ONE_AT_A_TIME.lock().await;
        let dir = TempDir::new("overload-4x");
        let (a, b) = (tomcat(&dir, "a"), tomcat(&dir, "b"));
        let (p, admin) = proxy(&dir, &[&a, &b]);
        // 800 requests/s: four times what the two servers can do.
        let r = tokio::task::spawn_blocking({
            let l = load(&dir, p.addr, 800, 6);
            move || l.join().expect("load thread")
        })
        .await
        .unwrap();
        eprintln!("load: {} {} {}", r["requests"], r["status"], r["latency_5xx_ms"]);
        let ok = r["status"]["200"].as_u64().unwrap_or(0);
        let shed = r["status"]["503"].as_u64().unwrap_or(0);
        assert_eq!(ok + shed, r["requests"]["scheduled"].as_u64().unwrap(), "only 200 and 503: {r}");
        assert_eq!(r["errors"], serde_json::json!({"check": 0, "connect": 0, "reset": 0, "timeout": 0}));
        assert_eq!(r["headers"]["1"].as_u64().unwrap_or(0), shed, "every 503 carries Retry-After: {}", r["headers"]);
        assert!(shed > 0, "4x overload must shed");
        // Shed on arrival, not after waiting out the queue (10 s).
        assert!(r["latency_5xx_ms"]["p99"].as_f64().unwrap() < 1_000.0, "{}", r["latency_5xx_ms"]);
        // The proxy learned to send each server about what it can take: the servers themselves refused little.
        let mut sent = 0;
        let mut refused = 0;
        for app in [&a, &b] {
            let s = get(app.addr, "/stats").await.json();
            sent += s["requests"]["ran"].as_u64().unwrap() + s["requests"]["rejected_queue_full"].as_u64().unwrap();
            refused += s["requests"]["rejected_queue_full"].as_u64().unwrap();
        }
        assert!(refused * 50 < sent, "the servers refused {refused} of {sent}");
        assert!(ok * 2 > sent, "most of what reached the servers succeeded: {ok} of {sent}");
        let servers = servers(admin).await;
        for app in [&a, &b] {
            let (limit, why) = limit_of(&servers, app.addr);
            assert!((2..=12).contains(&limit), "between the workers and their queue: {limit} ({why})");
            assert_ne!(why, "initial");
        }
        let metrics = String::from_utf8_lossy(&get(admin, "/metrics").await.body).to_string();
        assert!(metrics.contains("nonstop_server_limit{"), "the limit is a metric");
        drop(p);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_server_loses_its_limit_within_2s_and_the_other_carries_the_load() {
        let _one = ONE_AT_A_TIME.lock().await;
        let dir = TempDir::new("overload-stall");
        let (a, b) = (tomcat(&dir, "a"), tomcat(&dir, "b"));
        let (p, admin) = proxy(&dir, &[&a, &b]);
        // 80 requests/s: less than one server can do alone.
        let l = load(&dir, p.addr, 80, 9);
        tokio::time::sleep(Duration::from_secs(2)).await;
        b.signal(libc::SIGSTOP);
        let stopped = Instant::now();
        let mut fell = None;
        while stopped.elapsed() < Duration::from_secs(3) {
            let (limit, why) = limit_of(&servers(admin).await, b.addr);
            if limit <= 1 && fell.is_none() {
                fell = Some((stopped.elapsed(), why));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        b.signal(libc::SIGCONT);
        let (after, why) = fell.expect("the stalled server's limit fell to 1");
        eprintln!("limit fell after {after:?} ({why})");
        assert!(after <= Duration::from_secs(2), "{after:?}");
        assert_eq!(why, "stalled");
        let r = tokio::task::spawn_blocking(move || l.join().expect("load thread")).await.unwrap();
        eprintln!("load: {} {}", r["requests"], r["status"]);
        assert_eq!(r["requests"]["failed"], 0, "the other server had room for all of it: {r}");
        let (_, why) = limit_of(&servers(admin).await, b.addr);
        assert_ne!(why, "stalled", "answers again after SIGCONT");
        drop(p);
    }
}
