//! Tests of parsing, defaults, error collection and the generated reference.

use super::*;

const EXAMPLE: &str = include_str!("../../../examples/static.toml");

#[test]
fn example_static_parses_with_defaults() {
    let c = Config::parse(EXAMPLE).unwrap();
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.listeners[0].name, "public");
    assert_eq!(c.listeners[0].header_read_timeout, Duration::from_secs(10));
    let app = &c.services["app"];
    assert_eq!(app.servers.len(), 3);
    assert!(app.servers.iter().all(|s| s.weight == 1));
    assert_eq!(app.balance, Balance::RoundRobin);
    assert_eq!(app.connect_timeout, Duration::from_millis(1000));
    assert_eq!(app.protocol, Protocol::Http1);
    assert_eq!(c.routes[0].path_prefix, "/");
    assert_eq!(c.routes[0].body_bytes_max, 10 * 1024 * 1024);
    assert_eq!(c.admin.unwrap().listen, "127.0.0.1:9900".parse().unwrap());
    assert!(c.access_log.enabled);
}

#[test]
fn every_error_is_reported_at_once_with_its_line() {
    let text = r#"
[[listeners]]
listen = "127.0.0.1:8080"
colour = "blue"

[[routes]]
service = "missing"
path_prefix = "nope"

[services.app]
balance = "fastest"
connect_timeout_ms = "soon"
servers = [{ addr = "localhost" }, { addr = "127.0.0.1:1", weight = 99999 }]

[admin]
listen = "0.0.0.0:9900"
"#;
    let errs = Config::parse(text).unwrap_err().0;
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.path.as_str())).collect();
    assert_eq!(
        got,
        [
            (4, "listeners[0].colour"),
            (7, "routes[0].service"),
            (8, "routes[0].path_prefix"),
            (11, "services.app.balance"),
            (12, "services.app.connect_timeout_ms"),
            (13, "services.app.servers[0].addr"),
            (13, "services.app.servers[1].weight"),
            (16, "admin.listen"),
        ],
        "{errs:#?}"
    );
    let text = ConfigErrors(errs).to_string();
    assert!(text.starts_with("8 errors in the config:"), "{text}");
    assert!(text.contains("line 4: listeners[0].colour: unknown key (expected one of: name, listen,"), "{text}");
    assert!(text.contains("no service named \"missing\" (defined: app)"), "{text}");
    assert!(text.contains("admin.token is required"), "{text}");
}

#[test]
fn missing_sections_and_required_keys() {
    let errs = Config::parse("").unwrap_err().to_string();
    assert!(errs.contains("at least one listener"), "{errs}");
    assert!(errs.contains("at least one route"), "{errs}");
    assert!(errs.contains("at least one service"), "{errs}");
    let errs = Config::parse("[[listeners]]\n[[routes]]\n[services.a]\n").unwrap_err().to_string();
    assert!(errs.contains("listeners[0].listen: is required"), "{errs}");
    assert!(errs.contains("routes[0].service: is required"), "{errs}");
    assert!(errs.contains("services.a.servers: is required"), "{errs}");
}

#[test]
fn invalid_toml_reports_its_line() {
    let errs = Config::parse("[[listeners]]\nlisten = \n").unwrap_err().0;
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].line, 2);
    assert!(errs[0].message.starts_with("invalid TOML"));
}

#[test]
fn hash_balancing_and_duplicates() {
    let base = "[[listeners]]\nlisten = \"127.0.0.1:1\"\n[[routes]]\nservice = \"a\"\n[services.a]\n";
    let ok = format!("{base}balance = \"hash\"\nhash_on = \"cookie:sid\"\nservers = [{{ addr = \"127.0.0.1:2\" }}]\n");
    assert_eq!(Config::parse(&ok).unwrap().services["a"].balance, Balance::Hash(HashOn::Cookie("sid".into())));
    let no_on = format!("{base}balance = \"hash\"\nservers = [{{ addr = \"127.0.0.1:2\" }}]\n");
    assert!(Config::parse(&no_on).unwrap_err().to_string().contains("needs hash_on"));
    let dup = format!("{base}servers = [{{ addr = \"127.0.0.1:2\" }}, {{ addr = \"127.0.0.1:2\" }}]\n");
    assert!(Config::parse(&dup).unwrap_err().to_string().contains("listed twice"));
}

#[test]
fn quick_mode_has_the_same_defaults_as_a_file() {
    let to = vec!["127.0.0.1:9101".to_string(), "127.0.0.1:9102".to_string()];
    let c = Config::quick("127.0.0.1:8080", &to, "least_inflight", Some("127.0.0.1:9900")).unwrap();
    let file = Config::parse(EXAMPLE).unwrap();
    let (q, f) = (&c.services["default"], &file.services["app"]);
    assert_eq!(q.balance, Balance::LeastInflight);
    assert_eq!(
        (q.connect_timeout, q.response_timeout, q.pool_idle_max),
        (f.connect_timeout, f.response_timeout, f.pool_idle_max)
    );
    assert_eq!(c.listeners[0].max_connections, file.listeners[0].max_connections);
    let hashed = Config::quick("127.0.0.1:8080", &to, "hash=header:x-user", None).unwrap();
    assert_eq!(hashed.services["default"].balance, Balance::Hash(HashOn::Header("x-user".into())));
    let bad = Config::quick("nowhere", &to, "best", None).unwrap_err().to_string();
    assert!(bad.contains("--listen \"nowhere\": ") && bad.contains("--balance \"best\": "), "{bad}");
    assert!(!bad.contains("line "), "quick-mode errors name flags, not lines of the built text: {bad}");
    let to = vec!["127.0.0.1:9101".to_string(), "nothing".to_string()];
    let bad = Config::quick("127.0.0.1:8080", &to, "round_robin", Some("nowhere")).unwrap_err().to_string();
    assert!(bad.contains("--to \"nothing\": ") && bad.contains("--admin \"nowhere\": "), "{bad}");
}

#[test]
fn every_schema_default_is_valid_toml() {
    for k in schema::SCHEMA {
        if !k.default.is_empty() {
            assert!(toml::de::DeValue::parse(k.default).is_ok(), "{}.{}", k.section, k.name);
        }
    }
}

#[test]
fn docs_config_md_is_generated_from_the_schema() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/config.md");
    let want = schema::reference_markdown();
    if std::env::var_os("NONSTOP_BLESS").is_some() {
        std::fs::write(path, &want).unwrap();
    }
    let have = std::fs::read_to_string(path).unwrap_or_default();
    assert!(have == want, "docs/config.md is stale: run NONSTOP_BLESS=1 cargo test -p nonstop-config");
}

#[test]
fn resilience_is_on_by_default() {
    let c = Config::parse(EXAMPLE).unwrap();
    let app = &c.services["app"];
    assert!(app.health.enabled && app.health.path.is_none());
    assert_eq!((app.health.interval, app.health.rise, app.health.fall), (Duration::from_secs(1), 2, 2));
    assert_eq!(app.health.expect_status, (200, 399));
    assert!(app.eject.enabled);
    assert_eq!(app.eject.max_percent, 50);
    assert_eq!(app.retry.attempts_max, 3);
    assert_eq!(app.retry.on_status, [502, 503, 504]);
    assert!(!app.retry.add_idempotency_key);
    assert_eq!(app.admission.queue_wait_max, Duration::from_secs(10));
    assert!(app.servers.iter().all(|s| !s.backup));
}

#[test]
fn resilience_sections_are_validated() {
    let text = r#"[[listeners]]
listen = "127.0.0.1:8080"
[[routes]]
service = "app"
[services.app]
request_timeout_ms = 5000
servers = [{ addr = "127.0.0.1:1", backup = true }]
[services.app.health]
path = "health"
expect_status = "200-99"
[services.app.eject]
base_ms = 5000
max_ms = 10
[services.app.retry]
on_status = [503, 700]
tries = 2
[services.app.admission]
queue_wait_ms_max = 10000
"#;
    let errs = Config::parse(text).unwrap_err().0;
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.path.as_str())).collect();
    assert_eq!(
        got,
        [
            (6, "services.app.request_timeout_ms"),
            (7, "services.app.servers"),
            (9, "services.app.health.path"),
            (10, "services.app.health.expect_status"),
            (13, "services.app.eject.max_ms"),
            (15, "services.app.retry.on_status[1]"),
            (16, "services.app.retry.tries"),
        ],
        "{errs:#?}"
    );
    let ok = text
        .replace("request_timeout_ms = 5000", "")
        .replace("backup = true", "backup = false")
        .replace("path = \"health\"", "path = \"/health\"")
        .replace("200-99", "200")
        .replace("max_ms = 10", "max_ms = 60000")
        .replace(", 700", "")
        .replace("tries = 2", "add_idempotency_key = true");
    let c = Config::parse(&ok).unwrap();
    let app = &c.services["app"];
    assert_eq!(app.health.path.as_deref(), Some("/health"));
    assert_eq!(app.health.expect_status, (200, 200));
    assert_eq!(app.retry.on_status, [503]);
    assert!(app.retry.add_idempotency_key);
}

#[test]
fn example_queue_parses_and_ties_the_queue_to_its_routes_service() {
    let c = Config::parse(include_str!("../../../examples/queue.toml")).unwrap();
    let q = &c.queues["orders"];
    assert_eq!((q.service.as_str(), q.path.to_str().unwrap()), ("app", "./nonstop-data"));
    assert_eq!((q.length_max, q.concurrency, q.attempts_max), (100_000, 16, 10));
    assert_eq!(c.routes[0].queue.as_deref(), Some("orders"));
    assert_eq!(c.routes[1].queue, None);
}

#[test]
fn queue_errors_are_reported_with_their_lines() {
    let text = r#"[[listeners]]
listen = "127.0.0.1:8080"
[[routes]]
service = "a"
queue = "missing"
[[routes]]
service = "a"
queue = "shared"
[[routes]]
service = "b"
queue = "shared"
[services.a]
servers = [{ addr = "127.0.0.1:1" }]
[services.b]
servers = [{ addr = "127.0.0.1:2" }]
[queues.shared]
store = "kafka"
[queues.unused]
concurrency = 0
"#;
    let errs = Config::parse(text).unwrap_err().0;
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.path.as_str())).collect();
    assert_eq!(
        got,
        [
            (5, "routes[0].queue"),
            (16, "queues.shared"),
            (17, "queues.shared.store"),
            (18, "queues.unused"),
            (19, "queues.unused.concurrency"),
        ],
        "{errs:#?}"
    );
}

#[test]
fn app_sections_are_parsed_and_every_error_is_reported() {
    let base = "[[listeners]]\nlisten = \"127.0.0.1:1\"\n[[routes]]\nservice = \"a\"\n[services.a.app]\n";
    let ok = format!(
        "{base}command = \"nonstop app --listen {{addr}}\"\nports = \"9101-9106\"\nenv = {{ RUST_LOG = \"warn\" }}\n"
    );
    let c = Config::parse(&ok).unwrap();
    let app = c.services["a"].app.as_ref().unwrap();
    assert!(c.services["a"].servers.is_empty());
    assert_eq!((app.count, app.ports, app.strategy), (3, (9101, 9106), Strategy::Rolling));
    assert_eq!(app.canary_steps, [10, 50, 100]);
    assert_eq!(app.env, [("RUST_LOG".to_string(), "warn".to_string())]);
    assert_eq!(c.state_dir, std::path::PathBuf::from("./nonstop-state"));

    let bad = "[[listeners]]\nlisten = \"127.0.0.1:1\"\n[[routes]]\nservice = \"a\"\n[services.a]\n\
               servers = [{ addr = \"127.0.0.1:2\" }]\n[services.a.app]\nports = \"9101-9103\"\n\
               canary_steps = [50, 10]\nstrategy = \"yolo\"\nversion = \"v 2\"\ncolour = 1\n";
    let errs = Config::parse(bad).unwrap_err().to_string();
    for want in [
        "services.a.servers: a service with an app section has no servers list",
        "services.a.app.command: is required",
        "line 8: services.a.app.ports: 9101-9103 holds 3 ports; 6 are needed",
        "line 9: services.a.app.canary_steps: [50, 10]: steps must rise",
        "line 10: services.a.app.strategy: \"yolo\"",
        "line 11: services.a.app.version",
        "line 12: services.a.app.colour: unknown key",
    ] {
        assert!(errs.contains(want), "missing {want:?} in:\n{errs}");
    }
    let overlap = format!(
        "{ok}[[routes]]\nservice = \"b\"\npath_prefix = \"/b\"\n[services.b.app]\ncommand = \"x\"\nports = \"9105-9110\"\n"
    );
    let errs = Config::parse(&overlap).unwrap_err().to_string();
    assert!(errs.contains("services.b.app.ports: overlaps the ports of service \"a\""), "{errs}");
}

#[test]
fn queue_names_are_plain_words_and_errors_name_the_key_with_its_line() {
    for good in ["orders", "Orders_2-b", &"q".repeat(64)] {
        assert!(valid_queue_name(good), "{good:?}");
    }
    for bad in ["", "../x", "a/b", "x.y", "a b", "é", &"q".repeat(65)] {
        assert!(!valid_queue_name(bad), "{bad:?}");
    }
    let text = r#"[[listeners]]
listen = "127.0.0.1:8080"
[[routes]]
service = "a"
queue = "../escape"
[services.a]
servers = [{ addr = "127.0.0.1:1" }]
[queues."../escape"]
path = "./data"
"#;
    let errs = Config::parse(text).unwrap_err().0;
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.path.as_str())).collect();
    assert_eq!(got, [(8, "queues.../escape")], "{errs:#?}");
    assert!(errs[0].message.contains("[A-Za-z0-9_-]"), "{errs:#?}");
}

#[test]
fn queue_status_body_and_body_bytes_in_flight_have_defaults_and_are_checked() {
    let base = "[[listeners]]\nlisten = \"127.0.0.1:8080\"\n[[routes]]\nservice = \"a\"\nqueue = \"q\"\n\
                body_bytes_max = 2000\n[services.a]\nservers = [{ addr = \"127.0.0.1:1\" }]\n[queues.q]\n";
    let c = Config::parse(base).unwrap();
    assert_eq!((c.queues["q"].status_body, c.queues["q"].body_bytes_in_flight_max), (false, 64 << 20));
    let c = Config::parse(&format!("{base}status_body = true\nbody_bytes_in_flight_max = 2000\n")).unwrap();
    assert_eq!((c.queues["q"].status_body, c.queues["q"].body_bytes_in_flight_max), (true, 2000));
    let errs = Config::parse(&format!("{base}status_body = 1\n")).unwrap_err().0;
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.path.as_str())).collect();
    assert_eq!(got, [(10, "queues.q.status_body")], "{errs:#?}");
    let errs = Config::parse(&format!("{base}\nbody_bytes_in_flight_max = 1999\n")).unwrap_err().0;
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.path.as_str())).collect();
    assert_eq!(got, [(11, "queues.q.body_bytes_in_flight_max")], "{errs:#?}");
    assert!(errs[0].message.contains("body_bytes_max of a route"), "{errs:#?}");
    let errs = Config::parse(&format!("{base}body_bytes_in_flight_max = 0\n")).unwrap_err().0;
    assert_eq!(errs[0].path, "queues.q.body_bytes_in_flight_max", "{errs:#?}");
}

#[test]
fn a_docker_app_section_is_typed_and_its_errors_carry_lines() {
    let base = "[[listeners]]\nlisten = \"127.0.0.1:1\"\n[[routes]]\nservice = \"a\"\n[services.a.app]\n";
    let ok = format!(
        "{base}driver = \"docker\"\nimage = \"nonstop-app:{{version}}\"\nports = \"9101-9106\"\n\
         volumes = [\"/srv/data:/data\"]\nargs = [\"app\", \"--workers\", \"8\"]\n"
    );
    let c = Config::parse(&ok).unwrap();
    let app = c.services["a"].app.as_ref().unwrap();
    assert_eq!(app.driver.as_str(), "docker");
    let AppDriver::Docker(d) = &app.driver else { panic!("a docker driver: {:?}", app.driver) };
    assert_eq!(d.image, "nonstop-app:{version}");
    assert_eq!((d.container_port, d.keep_versions), (9001, 2));
    assert_eq!(d.volumes, ["/srv/data:/data"]);
    assert_eq!(d.args, ["app", "--workers", "8"]);
    assert!(app.command.is_empty());

    // Defaults: the process driver.
    let plain = format!("{base}command = \"x\"\nports = \"9101-9106\"\n");
    assert_eq!(Config::parse(&plain).unwrap().services["a"].app.as_ref().unwrap().driver, AppDriver::Process);

    let bad = format!(
        "{base}driver = \"docker\"\nports = \"9101-9106\"\ncommand = \"x\"\ncontainer_port = 0\n\
         volumes = [\"data:/data\"]\nkeep_versions = 0\nimage_tag = \"v1\"\n"
    );
    let errs = Config::parse(&bad).unwrap_err().to_string();
    for want in [
        "line 5: services.a.app.image: is required",
        "line 8: services.a.app.command: the docker driver runs image with args",
        "line 9: services.a.app.container_port: 0 is out of range 1..=65535",
        "line 10: services.a.app.volumes: \"data:/data\": expected",
        "line 11: services.a.app.keep_versions: 0 is out of range",
        "line 12: services.a.app.image_tag: unknown key",
    ] {
        assert!(errs.contains(want), "missing {want:?} in:\n{errs}");
    }

    let wrong =
        format!("{base}driver = \"podman\"\ncommand = \"x\"\nports = \"9101-9106\"\nimage = \"nonstop-app:v1\"\n");
    let errs = Config::parse(&wrong).unwrap_err().to_string();
    assert!(
        errs.contains("line 6: services.a.app.driver: \"podman\": expected \"process\", \"docker\" or \"ssh\""),
        "{errs}"
    );
    let process_with_image = format!("{base}command = \"x\"\nports = \"9101-9106\"\nimage = \"nonstop-app:v1\"\n");
    let errs = Config::parse(&process_with_image).unwrap_err().to_string();
    assert!(errs.contains("line 8: services.a.app.image: only the docker driver takes this key"), "{errs}");
}

#[test]
fn the_docker_example_is_accepted() {
    let c = Config::parse(include_str!("../../../examples/docker.toml")).unwrap();
    let app = c.services["app"].app.as_ref().unwrap();
    let AppDriver::Docker(d) = &app.driver else { panic!("examples/docker.toml uses the docker driver") };
    assert_eq!((d.image.as_str(), d.container_port, app.count), ("nonstop-app:{version}", 9001, 3));
}

const HOSTS_EXAMPLE: &str = include_str!("../../../examples/hosts.toml");

#[test]
fn the_hosts_example_is_accepted_with_its_defaults() {
    let c = Config::parse(HOSTS_EXAMPLE).unwrap();
    assert_eq!(c.hosts.len(), 3);
    let web1 = &c.hosts["web1"];
    assert_eq!((web1.host.as_str(), web1.port, web1.user.as_str()), ("10.0.0.11", 22, "deploy"));
    assert_eq!(web1.identity, PathBuf::from("./nonstop-state/ssh/id_ed25519"));
    assert_eq!(web1.dir, "~/nonstop");
    assert_eq!(web1.connect_timeout, Duration::from_millis(5000));
    assert_eq!((web1.max_startups, web1.max_sessions), (10, 10));
    let web2 = &c.hosts["web2"];
    assert_eq!((web2.port, web2.dir.as_str()), (2222, "/srv/nonstop"));
    assert_eq!(web2.connect_timeout, Duration::from_millis(3000));
    assert_eq!(c.hosts["web3"].user, "root");
    let app = c.services["app"].app.as_ref().unwrap();
    let AppDriver::Ssh(ssh) = &app.driver else { panic!("examples/hosts.toml uses the ssh driver") };
    assert_eq!(ssh.hosts, ["web1", "web2", "web3"]);
    assert_eq!(app.count, 1);
    let job = &c.pipelines["prune-logs"].stages[0].steps[0];
    assert_eq!(job.host.as_ref().map(|h| h.name.as_str()), Some("web1"), "the job runs on web1");
    assert_eq!(job.dir, None, "in the host's dir");
}

#[test]
fn host_addresses_take_a_default_port_and_brackets_for_ipv6() {
    assert_eq!(parse_host_address("10.0.0.5").unwrap(), ("10.0.0.5".into(), 22));
    assert_eq!(parse_host_address("web1.example.com:2222").unwrap(), ("web1.example.com".into(), 2222));
    assert_eq!(parse_host_address("[2001:db8::5]:2200").unwrap(), ("2001:db8::5".into(), 2200));
    assert_eq!(parse_host_address("2001:db8::5").unwrap(), ("2001:db8::5".into(), 22));
    for bad in ["", ":22", "web1:0", "web1:x", "[web1]:22", "a b", "-oProxyCommand=x", "web1:70000"] {
        assert!(parse_host_address(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn host_errors_name_the_host_and_carry_their_lines() {
    let text = r#"
[[listeners]]
listen = "127.0.0.1:8080"
[[routes]]
service = "app"
[services.app]
servers = [{ addr = "127.0.0.1:9001" }]

[hosts.web1]
address = "web1:99999"
user = "no spaces"
colour = "blue"

[hosts.web2]
connect_timeout_ms = 0
identity = "/keys/web2"

[hosts."bad name"]
address = "10.0.0.1"
"#;
    let errors = Config::parse(text).unwrap_err().0;
    let find = |path: &str| {
        errors.iter().find(|e| e.path == path).unwrap_or_else(|| panic!("no error at {path}: {errors:?}")).line
    };
    assert_eq!(find("hosts.web1.address"), 10);
    assert_eq!(find("hosts.web1.user"), 11);
    assert_eq!(find("hosts.web1.colour"), 12);
    assert_eq!(find("hosts.web2.address"), 14);
    assert_eq!(find("hosts.web2.connect_timeout_ms"), 15);
    assert_eq!(find("hosts.bad name"), 18);
    assert_eq!(errors.len(), 6, "{errors:?}");
}

#[test]
fn an_ssh_app_section_names_defined_hosts_and_its_errors_carry_lines() {
    let base = "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nservice = \"a\"\n[services.a.app]\n";
    let hosts = "\n[hosts.web1]\naddress = \"10.0.0.1\"\n[hosts.web2]\naddress = \"10.0.0.2:2222\"\n";
    let good = format!(
        "state_dir = \"/s\"\n{base}driver = \"ssh\"\nhosts = [\"web1\", \"web2\"]\ncount = 2\nrelease = \"/build/{{version}}\"\n\
         command = \"./app --listen {{addr}}\"\nports = \"9101-9106\"\n{hosts}"
    );
    let c = Config::parse(&good).unwrap_or_else(|e| panic!("{e}"));
    let app = c.services["a"].app.as_ref().unwrap();
    assert_eq!(app.driver.as_str(), "ssh");
    let AppDriver::Ssh(ssh) = &app.driver else { panic!("{:?}", app.driver) };
    assert_eq!(ssh.hosts, ["web1", "web2"]);
    assert_eq!(ssh.release.as_deref(), Some(std::path::Path::new("/build/{version}")));
    assert_eq!(ssh.keep_releases, 3);
    assert_eq!(app.count, 2);

    let bad = format!(
        "state_dir = \"/s\"\n{base}driver = \"ssh\"\nhosts = [\"web1\", \"web9\", \"web1\"]\nimage = \"x\"\n\
         keep_releases = 1\nports = \"9101-9106\"\n{hosts}"
    );
    let errs = Config::parse(&bad).unwrap_err().to_string();
    for want in [
        "line 6: services.a.app.command: is required",
        "line 8: services.a.app.hosts: \"web9\" is not a [hosts.NAME] table (defined: web1, web2); \"web1\" is named twice",
        "line 9: services.a.app.image: not an ssh driver key",
        "line 10: services.a.app.keep_releases:",
    ] {
        assert!(errs.contains(want), "missing {want:?} in:\n{errs}");
    }
    let process_with_hosts =
        format!("state_dir = \"/s\"\n{base}command = \"x\"\nports = \"9101-9106\"\nhosts = [\"web1\"]\n{hosts}");
    let errs = Config::parse(&process_with_hosts).unwrap_err().to_string();
    assert!(errs.contains("line 9: services.a.app.hosts: only the ssh and docker drivers take this key"), "{errs}");
}

#[test]
fn queue_finished_retention_has_defaults_and_is_checked() {
    let base = "[[listeners]]\nlisten = \"127.0.0.1:8080\"\n[[routes]]\nservice = \"a\"\nqueue = \"q\"\n\
                [services.a]\nservers = [{ addr = \"127.0.0.1:1\" }]\n[queues.q]\n";
    let c = Config::parse(base).unwrap();
    assert_eq!(c.queues["q"].finished_keep_max, 100_000);
    assert_eq!(c.queues["q"].finished_keep, std::time::Duration::from_secs(7 * 86_400));
    let c = Config::parse(&format!("{base}finished_keep_max = 0\nfinished_keep_ms = 1000\n")).unwrap();
    assert_eq!((c.queues["q"].finished_keep_max, c.queues["q"].finished_keep.as_millis()), (0, 1000));
    let errs = Config::parse(&format!("{base}finished_keep_max = -1\n")).unwrap_err().0;
    let got: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(got, ["queues.q.finished_keep_max"], "{errs:#?}");
}

#[test]
fn every_bad_value_of_an_array_is_reported_on_its_own_line() {
    let text = "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\nservice = \"s\"\nmethods = [\n  \"GET\",\n  \
                \"P T\",\n  7,\n  \"\",\n  true,\n]\n\n[services.s]\nservers = [{ addr = \"127.0.0.1:1\" }]\n\n\
                [services.s.retry]\non_status = [502, 99,\n  700, \"x\"]\n";
    let e = Config::parse(text).unwrap_err().to_string();
    for want in [
        "line 9: routes[0].methods[2]: expected a string, got an integer",
        "line 11: routes[0].methods[4]: expected a string, got a boolean",
        "line 18: services.s.retry.on_status[1]: 99 is out of range 100..=599",
        "line 19: services.s.retry.on_status[2]: 700 is out of range 100..=599",
        "line 19: services.s.retry.on_status[3]: expected an integer, got a string",
    ] {
        assert!(e.contains(want), "{want:?} in:\n{e}");
    }
    let strings_only = text.replace("  7,\n", "  \"7x\",\n").replace("  true,\n", "  \"OK\",\n");
    let e = Config::parse(&strings_only).unwrap_err().to_string();
    assert!(e.contains("routes[0].methods: \"P T\", \"7x\", \"\" are not HTTP methods"), "{e}");
}

#[test]
fn the_pipeline_example_parses_into_a_pipeline_a_job_and_a_windowed_queue() {
    let c = Config::parse(include_str!("../../../examples/pipeline.toml")).unwrap();
    let web = &c.pipelines["web"];
    assert_eq!(web.kind, crate::PipelineKind::Pipeline);
    assert_eq!(web.source.as_ref().unwrap().branch, "main");
    let names: Vec<(&str, &str)> =
        web.stages.iter().flat_map(|s| s.steps.iter().map(move |st| (s.name.as_str(), st.action.kind()))).collect();
    assert_eq!(names, [("build", "run"), ("test", "run"), ("ship", "deploy"), ("ship", "verify")]);
    assert!(web.webhook.is_some());
    assert!(c.pipelines.values().any(|p| p.kind == crate::PipelineKind::Job && p.schedule.is_some()));
    assert!(c.queues.values().any(|q| q.deliver_window.is_some()));
}

#[test]
fn pipeline_errors_are_all_reported_with_their_lines() {
    let text = "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nservice = \"s\"\n\
                [services.s]\nservers = [{ addr = \"127.0.0.1:1\" }]\n\
                [pipelines.p]\nrepo = \"/r.git\"\nschedule = \"61 * * * *\"\nconcurrency = \"sometimes\"\nafter = [\"nobody\"]\n\
                [[pipelines.p.stages]]\nname = \"b\"\nsteps = [\n  { run = \"make\", deploy = \"s\" },\n  \
                { deploy = \"s\", artifact = \"dist\" },\n  { verify = \"ghost\", bogus = 1 },\n  { name = \"x\" },\n]\n\
                [jobs.j]\nschedule = \"* * * * *\"\ntime_zone = \"Mars/Olympus\"\n\
                [jobs.p]\ncommand = \"true\"\n\
                [jobs.k]\ncommand = \"true\"\nhost = \"ghost\"\n\
                [pipelines.q]\nrepo = \"/q.git\"\nafter = [\"nobody\"]\n[[pipelines.q.stages]]\nsteps = [{ run = \"true\" }]\n";
    let e = Config::parse(text).unwrap_err().to_string();
    for want in [
        "line 9: pipelines.p.schedule: schedule: \"61 * * * *\": minute 61 is out of range 0-59",
        "line 10: pipelines.p.concurrency: \"sometimes\": expected \"queue\", \"forbid\" or \"cancel\"",
        "pipelines.q.after: \"nobody\" is no other pipeline or job",
        "line 15: pipelines.p.stages[0].steps[0]: a step is one of run, deploy or verify, not run and deploy",
        "line 16: pipelines.p.stages[0].steps[1].deploy: service \"s\" has no app section",
        "line 17: pipelines.p.stages[0].steps[2].verify: \"ghost\" is no [services.NAME]",
        "line 17: pipelines.p.stages[0].steps[2].bogus: unknown key",
        "line 18: pipelines.p.stages[0].steps[3]: a step needs one of run",
        "jobs.j.time_zone:",
        "\"p\" names a pipeline too",
        "line 27: jobs.k.host: \"ghost\" is not a [hosts.NAME] table (defined: none)",
    ] {
        assert!(e.contains(want), "{want:?} in:\n{e}");
    }
}

#[test]
fn a_pipeline_file_in_a_repository_is_checked_like_the_config() {
    let f = crate::PipelineFile::parse(
        "[[stages]]\nname = \"build\"\nsteps = [{ run = \"make\", artifacts = [\"out\"] }]\n\
         [[stages]]\nname = \"ship\"\nsteps = [{ deploy = \"web\", artifact = \"out\" }]\n\
         [[post]]\non = \"failure\"\nrun = \"echo failed\"\n",
    )
    .unwrap();
    assert_eq!((f.stages.len(), f.post.len()), (2, 1));
    assert_eq!(f.post[0].on, crate::PostOn::Failure);
    let e = crate::PipelineFile::parse(
        "[[stages]]\nsteps = [{ run = \"make\", artifacts = [\"../x\"] }]\n[[post]]\nrun = \"x\"\nwhen = { trigger = [\"cron\"] }\n",
    )
    .unwrap_err()
    .to_string();
    for want in [
        "line 2: stages[0].steps[0].artifacts: \"../x\": an artifact is a relative path inside the workspace",
        "line 3: post[0].on: is required",
        "trigger: \"cron\": expected one of push, manual, schedule, after",
    ] {
        assert!(e.contains(want), "{want:?} in:\n{e}");
    }
}

#[test]
fn the_guard_example_is_accepted_with_its_defaults() {
    let c = Config::parse(include_str!("../../../examples/guard.toml")).unwrap();
    assert_eq!(c.listeners[0].trusted_proxies, [nonstop_guard::parse_net("10.0.0.2").unwrap()]);
    let access = c.routes[0].access.as_ref().unwrap();
    assert_eq!(access.allow.len(), 2);
    assert_eq!(access.deny[0].to_string(), "192.168.10.99/32");
    let api = c.routes[1].rate_limit.as_ref().unwrap();
    assert_eq!(api.rate, nonstop_guard::Rate { interval: Duration::from_millis(50), burst: 40 });
    assert_eq!(api.key, RateKey::Header("x-api-key".into()));
    assert_eq!(api.keys_max, 100_000);
    // requests_per_min = 10: one every 6 s, and a second's worth of burst is still at least one request.
    let login = c.routes[2].rate_limit.as_ref().unwrap();
    assert_eq!(login.rate, nonstop_guard::Rate { interval: Duration::from_secs(6), burst: 1 });
    assert_eq!(login.key, RateKey::Client);
    assert!(c.routes[3].access.is_none() && c.routes[3].rate_limit.is_none());
    // requests_per_s = 20 with no burst: a second's worth.
    let text = include_str!("../../../examples/guard.toml").replace("burst = 40\n", "");
    let c = Config::parse(&text).unwrap();
    assert_eq!(c.routes[1].rate_limit.as_ref().unwrap().rate.burst, 20);
}

#[test]
fn an_empty_access_table_and_a_rate_limit_without_a_rate_are_refused() {
    let text = "[[listeners]]\nlisten = \"127.0.0.1:8080\"\n[[routes]]\nservice = \"a\"\n[routes.access]\n\
                [[routes]]\nservice = \"a\"\npath_prefix = \"/x\"\n[routes.rate_limit]\nburst = 0\n\
                [services.a]\nservers = [{ addr = \"127.0.0.1:1\" }]\n";
    let e = Config::parse(text).unwrap_err().to_string();
    assert!(e.contains("line 5: routes[0].access: neither allow nor deny lists an address"), "{e}");
    assert!(e.contains("line 10: routes[1].rate_limit.burst: 0 is out of range 1..=1000000"), "{e}");
    assert!(e.contains("routes[1].rate_limit: requests_per_s (or requests_per_min) is required"), "{e}");
}

#[test]
fn the_rewrite_example_is_accepted_and_rewrites_as_its_comments_say() {
    use nonstop_rewrite::{Prefix, Rewritten};
    let c = Config::parse(include_str!("../../../examples/rewrite.toml")).unwrap();
    assert_eq!(c.listeners[0].request_id_header.as_deref(), Some("x-request-id"));
    let api = &c.routes[0];
    assert_eq!(api.rewrite.prefix, Prefix::Strip("/api".into()));
    assert_eq!(api.rewrite.apply("/api/v1/users", None), Rewritten::Target("/v2/users".into()));
    assert_eq!(
        api.rewrite.apply("/api/legacy/a", Some("b=1")),
        Rewritten::Redirect { status: 301, location: "https://legacy.example.com/a?b=1".into() }
    );
    assert_eq!(api.request_headers.remove, ["cookie"]);
    assert_eq!(api.request_headers.set[0].0, "x-real-ip");
    assert!(api.request_headers.uses(nonstop_rewrite::Var::Client));
    assert_eq!(api.response_headers.remove, ["server", "x-powered-by"]);
    assert_eq!(c.routes[1].rewrite.apply("/shop/cart", None), Rewritten::Target("/store/cart".into()));
    assert!(c.routes[2].rewrite.is_empty() && c.routes[2].request_headers.is_empty());
    // Without request_id_header, no ids.
    assert_eq!(Config::parse(EXAMPLE).unwrap().listeners[0].request_id_header, None);
}

#[test]
fn dns_names_are_labels_of_letters_digits_and_hyphens_and_never_an_ipv4_address() {
    for ok in ["app", "app.internal", "a-b.example.com", "x1.y2.", "localhost"] {
        assert!(crate::is_dns_name(ok), "{ok}");
    }
    let long = "a".repeat(64);
    for bad in ["", "-a.b", "a-.b", "a..b", "a_b.c", "10.0.0.300", "1.2.3.4", "app:80", long.as_str()] {
        assert!(!crate::is_dns_name(bad), "{bad}");
    }
}
