//! The one definition of every config key: its section, type, default and meaning. The parser reads defaults from
//! here, rejects keys not listed here, and docs/config.md is generated from here.

/// One key of the config file.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// Where the key lives, as written in docs: `listeners[]`, `services.NAME`, ...
    pub section: &'static str,
    pub name: &'static str,
    pub ty: &'static str,
    /// The default as TOML text; empty for a key that is required or has no default.
    pub default: &'static str,
    pub doc: &'static str,
}

macro_rules! keys {
    ($( $section:literal $name:literal : $ty:literal = $default:literal, $doc:literal; )*) => {
        /// Every key, in documentation order.
        pub const SCHEMA: &[Key] = &[ $( Key { section: $section, name: $name, ty: $ty, default: $default, doc: $doc }, )* ];
    };
}

keys! {
    "" "listeners": "array of tables" = "", "Client-facing listeners. At least one.";
    "" "routes": "array of tables" = "", "Routes from requests to services, matched by host, then longest path prefix, then order. At least one.";
    "" "services": "table of tables" = "", "Services by name: a pool of servers and how to reach them.";
    "" "queues": "table of tables" = "", "Durable request queues by name (see routes[].queue).";
    "" "admin": "table" = "", "The admin API. Absent: no admin API.";
    "" "resolver": "table" = "", "How servers given by host name (services.NAME.servers[].addr = \"app.internal:8080\") are resolved, and how often again. Defaults apply when absent.";
    "" "state_dir": "path" = "\"./nonstop-state\"", "Where the proxy keeps what must outlive it: the deploy history (deploys.jsonl), each app service's current version, and the app instances' logs.";
    "" "access_log": "table" = "", "The access log: JSON lines or nginx's combined format, buffered per thread and written in large writes off the request path. Nothing answered before a clean shutdown (SIGTERM, SIGINT) is lost; a crash loses at most the last flush_ms. SIGUSR1 reopens the file (for logrotate).";
    "" "hosts": "table of tables" = "", "SSH hosts by name, the machines the deployers reach over SSH (see docs/hosts.md). Their keys are pinned in state_dir/ssh/known_hosts by nonstop hosts trust; nonstop hosts check checks them all.";
    "" "pipelines": "table of tables" = "", "Pipelines by name: build, test, deploy and verify runs of a git repository, started by hand, by a signed push webhook, on a schedule or after another pipeline (see docs/pipelines.md).";
    "" "jobs": "table of tables" = "", "Scheduled jobs by name: a command on a schedule, with history and logs, that never overlaps itself (see docs/pipelines.md).";

    "resolver" "nameservers": "array of strings" = "[]", "DNS servers to ask (\"10.0.0.2\", \"127.0.0.1:5353\"), in order. Empty: those of /etc/resolv.conf (and /etc/hosts is read).";
    "resolver" "interval_ms": "integer" = "30000", "Each name is resolved again at least this often, whatever its TTL (and at its TTL when sooner). A new address becomes a server (slow start); a vanished one stops taking requests (those in flight finish).";
    "resolver" "ttl_min_ms": "integer" = "1000", "...and at most this often, however short its TTL. A failed connect to a named server brings its name's next lookup forward, but not sooner than this after the last.";
    "resolver" "timeout_ms": "integer" = "2000", "One DNS query waits at most this long (tried twice per server). A name that cannot be resolved keeps its last good addresses; the failure is logged once, and again only when it changes or ends.";
    "listeners[]" "name" : "string" = "", "A name for logs and metrics [default: the address].";
    "listeners[]" "listen": "address" = "", "Address to accept clients on, such as \"127.0.0.1:8080\". Required.";
    "listeners[]" "proxy_protocol": "boolean" = "false", "Every connection starts with a PROXY protocol header (HAProxy's v1 text or v2 binary, as AWS NLB, HAProxy and nginx send), whose source address is then the client's: for access lists, rate limits, X-Forwarded-For and the access log. A connection without a valid header within header_read_timeout_ms is closed; with trusted_proxies set, so is one whose peer is not among them. A LOCAL (v2) or UNKNOWN (v1) header keeps the peer as the client.";
    "listeners[]" "redirect_https": "boolean" = "false", "Answer every request with 308 to the same host, path and query on https (at the port of the first TLS listener, left out when 443). For the plain HTTP listener beside a TLS one.";
    "listeners[]" "hsts_max_age_s": "integer" = "0", "Send Strict-Transport-Security: max-age=N on every answer of this TLS listener (63072000 is two years), so that browsers use https only. 0: not sent.";
    "listeners[]" "hsts_subdomains": "boolean" = "false", "Add includeSubDomains to the HSTS header.";
    "listeners[]" "hsts_preload": "boolean" = "false", "Add preload to the HSTS header (for browsers' preload lists).";
    "listeners[]" "tls": "table" = "", "Serve TLS (HTTP/1.1 and HTTP/2 by ALPN). Absent: plain HTTP/1.1 and h2c with prior knowledge.";
    "listeners[]" "max_connections": "integer" = "10000", "Open client connections at most, split evenly among worker threads (each serves at most max_connections / threads, rounded up); past it, new connections wait in the kernel's backlog.";
    "listeners[]" "header_read_timeout_ms": "integer" = "10000", "A client must send its whole request head within this time, or get 408 (slowloris). Also how long a connection may sit with no request in progress: an HTTP/1.1 keep-alive connection between requests, an HTTP/2 connection (then GOAWAY), a TLS connection after its handshake (which must itself finish within this time); and how long a request body the proxy keeps for replay, or a queued body, may take to arrive (408).";
    "listeners[]" "header_bytes_max": "integer" = "65536", "Largest request head in bytes; larger gets 431.";
    "listeners[]" "header_count_max": "integer" = "100", "Most request headers; more gets 431.";

    "listeners[]" "trusted_proxies": "array of strings" = "[]", "Proxies in front of this listener (addresses or CIDR networks, such as \"10.0.0.0/8\") whose X-Forwarded-For is believed. A request from one of them comes from the right-most X-Forwarded-For address that is not a trusted proxy: that is its client address for routes[].access and routes[].rate_limit. Entries left of it were written by the client and are ignored. Empty: the peer is the client, whatever the header says.";

    "listeners[]" "request_id_header": "string" = "\"\"", "The header that carries each request's id, such as \"X-Request-Id\": a request that brings one (1 to 128 visible characters) keeps it, any other gets 32 random hex digits. The server gets it, the client gets it back on the response, and the access log has it (request_id). Empty: no request ids ({request_id} in a header template then makes a fresh one).";

    "listeners[].tls" "cert": "path" = "", "PEM certificate chain: the default one, for clients that send no name (SNI) or a name no sni certificate is valid for. Required.";
    "listeners[].tls" "key": "path" = "", "PEM private key. Required.";
    "listeners[].tls" "sni": "array of tables" = "", "More certificates ({ cert = \"PATH\", key = \"PATH\" }): a client that asks for a name (SNI) gets the first of them valid for it (its subject alternative names, wildcards included), else the default.";
    "listeners[].tls" "min_version": "string" = "\"1.2\"", "The oldest TLS version offered: \"1.2\" (with only forward-secret AEAD suites, rustls' defaults) or \"1.3\". Older versions are never offered.";
    "listeners[].tls" "watch_interval_ms": "integer" = "2000", "How often the certificate and key files are checked for a change; a changed set is loaded for new connections (connections already open keep theirs, so a renewal drops none). A set that does not load is logged and the old one kept. 0: only on reload (SIGHUP), which always loads them.";
    "listeners[].tls.sni[]" "cert": "path" = "", "PEM certificate chain. Required.";
    "listeners[].tls.sni[]" "key": "path" = "", "PEM private key. Required.";

    "routes[]" "service": "string" = "", "The service that serves matching requests. Required, unless the route serves files.";
    "routes[]" "files": "table" = "", "Serve static files from a directory instead of sending to a service (not with service or queue). The path the route would send (after strip_prefix, replace_prefix and rewrites) names the file under root; access, rate_limit, header rules and compress apply as on any route.";
    "routes[]" "host": "string" = "", "Match only this Host (without port, case-insensitive). Absent: any host.";
    "routes[]" "path_prefix": "string" = "\"/\"", "Match paths that start with this prefix.";
    "routes[]" "methods": "array of strings" = "", "Match only these methods. Absent: any method.";
    "routes[]" "body_bytes_max": "integer" = "10485760", "Largest request body in bytes; larger gets 413.";
    "routes[]" "access": "table" = "", "Who may use the route, by client address (see listeners[].trusted_proxies); anyone else gets 403 with a message naming the address. Checked before the rate limit. Absent: everyone.";
    "routes[]" "rate_limit": "table" = "", "A rate limit per client address or key (GCRA): a request past it gets 429 with Retry-After, the seconds until it would pass. Refused requests do not count. Absent: no limit.";
    "routes[]" "strip_prefix": "boolean" = "false", "Cut path_prefix off the path the server gets: /api/users under /api becomes /users (and /api becomes /).";
    "routes[]" "replace_prefix": "string" = "", "Replace path_prefix by this in the path the server gets: /api/users under /api, replaced by /v2, becomes /v2/users. Not with strip_prefix.";
    "routes[]" "rewrite": "array of tables" = "", "Regex rewrites of the path, tried in order on the path the client sent; the first that matches applies (then strip_prefix or replace_prefix, if the path still starts with path_prefix).";
    "routes[]" "request_headers": "table" = "", "Headers of the request the server gets: remove, then set, then add (after the proxy's own X-Forwarded-* and Via, which set may replace).";
    "routes[]" "response_headers": "table" = "", "Headers of the response the client gets, from a server or from the proxy: remove, then set, then add (HSTS, security headers, hiding Server).";
    "routes[]" "compress": "table" = "", "Compress the servers' responses (zstd, brotli or gzip, as Accept-Encoding allows), on the fly with bounded memory: 2xx responses of a listed type, at least bytes_min long, not already encoded, not partial, without Cache-Control: no-transform, and not to HEAD. Such responses carry Vary: Accept-Encoding, compressed or not; a compressed one loses Content-Length and its ETag becomes weak. Absent: responses go as the server sent them.";
    "routes[]" "queue": "string" = "", "Persist matching requests durably in this queue and answer 202 Accepted with {id} and Location: /_nonstop/requests/{id}; the queue delivers them to the route's service, with Idempotency-Key: {id}. The id is QUEUE.KEY, KEY being 128 random bits in hex: unguessable, and unique across nodes and restarts. Absent: forward at once.";
    "routes[]" "basic_auth": "table" = "", "HTTP Basic authentication: a request without a user and password that pass gets 401 with WWW-Authenticate. Checked after access and rate_limit (so that a flood of guesses is limited before it costs a hash each). The Authorization header goes on to the server; remove it with request_headers.remove. Absent: no login.";
    "routes[]" "forward_auth": "table" = "", "Ask a service about each request before serving it, as nginx's auth_request and Traefik's forwardAuth do: a GET of path with the request's headers (not its body), plus X-Forwarded-Method, X-Forwarded-Uri, X-Forwarded-Host, X-Forwarded-Proto and X-Forwarded-For. A 2xx answer lets the request through (with copy_headers taken from it); any other answer (401 with a login page, 302 to a login, 403) goes to the client as it is, and the route's server never hears of the request. The service is balanced, checked and retried like any. After basic_auth, if both are set.";

    "routes[].access" "allow": "array of strings" = "[]", "Addresses or CIDR networks allowed (\"10.0.0.0/8\", \"2001:db8::/32\", \"127.0.0.1\"); when not empty, every other address is refused.";
    "routes[].access" "deny": "array of strings" = "[]", "Addresses or CIDR networks refused, even when allow lists them.";

    "routes[].rate_limit" "requests_per_s": "integer" = "", "The steady rate each key may send, in requests a second. This or requests_per_min is required.";
    "routes[].rate_limit" "requests_per_min": "integer" = "", "The steady rate in requests a minute, for rates under one a second.";
    "routes[].rate_limit" "burst": "integer" = "", "Requests a key may send at once after a quiet spell; over any span T at most burst + rate x T pass [default: one second's worth, at least 1].";
    "routes[].rate_limit" "key": "string" = "\"client\"", "What requests are counted by: \"client\" (the client address) or \"header:NAME\" (the value of header NAME, such as an API key; a request without it counts by its client address).";
    "routes[].rate_limit" "keys_max": "integer" = "100000", "Keys remembered at once, at most (each about 50 bytes); past it, the keys with the least debt are forgotten first. The limiter's state starts afresh when the config is reloaded.";

    "routes[].rewrite[]" "match": "string" = "", "A regex (Rust's regex syntax, at most 1 MiB compiled) on the path the client sent, such as \"^/old/(.*)$\". Required.";
    "routes[].rewrite[]" "to": "string" = "", "The new path, with $1 or ${name} for the regex's groups: \"/new/$1\". A ? in it sets the query, and the client's query follows after &; without one, the client's query stays. A redirect may go to another site (\"https://example.com/$1\"). Required.";
    "routes[].rewrite[]" "redirect": "integer" = "", "Answer the client with this status (301, 302, 303, 307 or 308) and Location set to the new path, instead of forwarding. Absent: rewrite and forward.";

    "routes[].forward_auth" "service": "string" = "", "The service that decides. Required.";
    "routes[].forward_auth" "path": "string" = "\"/\"", "The path (and query) it is asked.";
    "routes[].forward_auth" "copy_headers": "array of strings" = "[]", "Headers of its 2xx answer set on the request the route's server gets, such as [\"X-User\", \"X-Email\"]. A client's own headers of these names are always removed first, so that no client can claim to be someone.";
    "routes[].basic_auth" "realm": "string" = "\"nonstop\"", "The realm the browser shows in its login prompt.";
    "routes[].basic_auth" "users": "table of strings" = "{}", "Users and their password hashes: { alice = \"$argon2id$v=19$...\" }. argon2 PHC strings (nonstop hash-password makes them) and bcrypt ($2a$, $2b$, $2y$: htpasswd -nB USER) are accepted; a clear password, MD5 ($apr1$), SHA-1 ({SHA}) and crypt(3) are refused.";
    "routes[].basic_auth" "users_file": "path" = "", "An htpasswd file of USER:HASH lines (the same hashes as users), read when the config is loaded or reloaded; each bad line is reported.";
    "routes[].basic_auth" "verified_max": "integer" = "10000", "Credentials remembered after they pass (as SHA-256 digests, never the password), so that a user's next requests cost no hash; past it, the memory is emptied. A reload forgets them all.";
    "routes[].basic_auth" "verifying_max": "integer" = "2", "Password hashes verified at once on this route (each takes a core for tens of milliseconds, off the event loop); more requests wait their turn. Remembered credentials never wait.";
    "routes[].files" "root": "path" = "", "The directory served; it must exist when the config is loaded. Nothing outside it is ever served: a path with a .. segment, an encoded slash, backslash or NUL gets 400, and a symlink that leads out of root gets 403. Required.";
    "routes[].files" "index": "array of strings" = "[\"index.html\"]", "File names tried, in order, for a path that names a directory (a directory path without its trailing slash is redirected, 301, to the path with it). None there: 403, as directories are never listed.";
    "routes[].files" "precompressed": "boolean" = "true", "When the client's Accept-Encoding allows, answer with FILE.zst, FILE.br or FILE.gz beside FILE (made ahead, for example by a build step) with its Content-Encoding, and Vary: Accept-Encoding on every answer for a file that has such siblings.";
    "routes[].files" "hidden": "boolean" = "false", "Serve names that start with a dot (.git, .env, .well-known). Off: such a path gets 404.";
    "routes[].compress" "codings": "array of strings" = "[\"zstd\", \"br\", \"gzip\"]", "The codings offered, in order of preference: the client's weights choose, ties go to the earlier.";
    "routes[].compress" "types": "array of strings" = "[]", "Media types to compress, such as \"text/html\" or \"text/*\". Empty: text/html, text/plain, text/css, text/javascript, text/xml, text/csv, text/markdown, application/json, application/javascript, application/xml, application/xhtml+xml, application/rss+xml, application/atom+xml, application/problem+json, application/ld+json, application/manifest+json, application/wasm and image/svg+xml. text/event-stream is never compressed.";
    "routes[].compress" "bytes_min": "integer" = "1024", "Responses that declare a shorter Content-Length go as they are (too small to gain); responses of unknown length are compressed.";
    "routes[].compress" "streams_max": "integer" = "256", "Responses compressed at once on this route, at most (each holds at most about 300 KiB of compressor state); past it, responses go as they are.";

    "routes[].request_headers" "remove": "array of strings" = "[]", "Header names to take off.";
    "routes[].request_headers" "set": "table of strings" = "{}", "Headers to set, replacing any of the same name: { \"X-Real-IP\" = \"{client}\" }. Values may hold {client}, {peer}, {host}, {method}, {path}, {query}, {scheme} and {request_id}; {{ and }} are literal braces.";
    "routes[].request_headers" "add": "table of strings" = "{}", "Headers to add beside any of the same name, with the same variables as set.";

    "routes[].response_headers" "remove": "array of strings" = "[]", "Header names to take off, such as \"Server\" or \"X-Powered-By\".";
    "routes[].response_headers" "set": "table of strings" = "{}", "Headers to set, replacing any of the same name: { \"Strict-Transport-Security\" = \"max-age=31536000\" }. The same variables as request_headers.set.";
    "routes[].response_headers" "add": "table of strings" = "{}", "Headers to add beside any of the same name.";

    "services.NAME" "servers": "array of tables" = "", "The servers of the pool. At least one, unless the service has an app section (then the proxy's own instances are the servers).";
    "services.NAME" "app": "table" = "", "Run the service's servers as supervised local processes, and deploy new versions of them through the proxy (nonstop deploy). Replaces servers.";
    "services.NAME" "balance": "string" = "\"round_robin\"", "round_robin, weighted (smooth weighted round robin), least_inflight, peak_ewma (power of two choices on peak-EWMA latency) or hash.";
    "services.NAME" "hash_on": "string" = "", "With balance = \"hash\": \"header:NAME\", \"cookie:NAME\" or \"client_ip\". Requests with the same value stick to one server.";
    "services.NAME" "connect_timeout_ms": "integer" = "1000", "Connecting to a server takes at most this long (then the request goes to another server; if none is left, 504, body says \"connect timeout\").";
    "services.NAME" "response_timeout_ms": "integer" = "30000", "Per try: a server must send its response head within this long of the request (then a safe request is retried on another server; if it cannot be, 504, body says \"response timeout\").";
    "services.NAME" "request_timeout_ms": "integer" = "60000", "The whole request's deadline: queue wait, every try and retry, until the response head. No retry starts past it.";
    "services.NAME" "slow_start_ms": "integer" = "5000", "A server that recovers (active checks pass again, or its ejection ends) or is added takes a share of requests that ramps from 10% to 100% over this long. 0: no slow start.";
    "services.NAME" "drain_deadline_ms": "integer" = "30000", "When a server is drained, its long-lived requests (WebSocket, SSE, long polls) are closed gracefully this long after the drain began.";
    "services.NAME" "health": "table" = "", "Active health checks. On by default.";
    "services.NAME" "eject": "table" = "", "Passive outlier ejection, from the results of real requests. On by default.";
    "services.NAME" "retry": "table" = "", "Retries, always on a different server. On by default.";
    "services.NAME" "admission": "table" = "", "Admission control: a bounded queue in front of the servers. On by default.";
    "services.NAME" "pool_idle_timeout_ms": "integer" = "60000", "An idle pooled server connection is closed after this long.";
    "services.NAME" "pool_idle_max": "integer" = "128", "Idle pooled connections kept per server and worker thread.";
    "services.NAME" "protocol": "string" = "\"http1\"", "How to talk to servers: \"http1\" (keep-alive pool) or \"h2\" (HTTP/2 with prior knowledge, multiplexed).";
    "services.NAME" "hide_identity": "boolean" = "false", "Remove Server, X-Powered-By and X-Nonstop-Instance from responses, hiding which server answered.";

    "services.NAME.servers[]" "addr": "address" = "", "The server's address, such as \"127.0.0.1:9101\", or a host name with a port, such as \"app.internal:8080\": each address the name resolves to (A and AAAA records) is then a server with this entry's settings, and the name is resolved again as [resolver] says. Required.";
    "services.NAME.servers[]" "weight": "integer" = "1", "Relative share of requests (0 to 10000) for weighted balancing; 0 takes no new requests.";
    "services.NAME.servers[]" "in_flight_max": "integer" = "", "Requests this server is sent at once. Absent: the service's admission.server_in_flight_max.";
    "services.NAME.servers[]" "backup": "boolean" = "false", "A backup server takes requests only while no primary server can (all are down, ejected, draining or full, or a request has tried them all). Traffic fails back to the primaries, with slow start, when they recover.";

    "services.NAME.health" "enabled": "boolean" = "true", "Check every server of the service in the background.";
    "services.NAME.health" "path": "string" = "", "GET this path and expect expect_status. Absent: the check is a TCP connect.";
    "services.NAME.health" "interval_ms": "integer" = "1000", "Time between two checks of one server.";
    "services.NAME.health" "timeout_ms": "integer" = "1000", "A check that takes longer fails.";
    "services.NAME.health" "rise": "integer" = "2", "Consecutive passes that bring a down server back up.";
    "services.NAME.health" "fall": "integer" = "2", "Consecutive failures that take an up server down.";
    "services.NAME.health" "expect_status": "string" = "\"200-399\"", "The statuses that pass: one (\"200\") or a range (\"200-399\").";

    "services.NAME.eject" "enabled": "boolean" = "true", "Eject servers that fail real requests.";
    "services.NAME.eject" "consecutive_failures": "integer" = "5", "Consecutive failures (connect errors, timeouts, resets, 5xx) that eject a server. After an ejection ends, the first failure ejects it again.";
    "services.NAME.eject" "base_ms": "integer" = "1000", "The first ejection's length; each further one in a row doubles it.";
    "services.NAME.eject" "max_ms": "integer" = "30000", "The longest ejection.";
    "services.NAME.eject" "max_percent": "integer" = "50", "Share of the primary servers that may be ejected at once (at least one); past it, the proxy fails open and keeps using the others.";

    "services.NAME.retry" "attempts_max": "integer" = "3", "Tries per request that reached a server, the first included. Tries that provably never reached one (connect refused or timed out, a pooled connection dead before the request was written, HTTP/2 REFUSED_STREAM) are not counted: they are bounded by request_timeout_ms.";
    "services.NAME.retry" "on_status": "array of integers" = "[502, 503, 504]", "Server statuses after which a retryable request is tried on another server.";
    "services.NAME.retry" "budget_percent": "integer" = "20", "Retries of requests that reached a server stay under this share of the service's requests over the last 10 s,";
    "services.NAME.retry" "budget_min_per_s": "integer" = "3", "Or, when more, this many retries per second.";
    "services.NAME.retry" "body_bytes_max": "integer" = "65536", "Request bodies up to this size are kept for replay. A larger (or chunked) body is retried only when it was never sent.";
    "services.NAME.retry" "add_idempotency_key": "boolean" = "false", "Add an Idempotency-Key header (a random UUID) to every POST and PATCH that has none, so that they can be retried like idempotent requests. Turn on only when the servers honour the key.";

    "services.NAME.admission" "server_in_flight_max": "integer" = "256", "Requests one server is sent at once, at most. With adaptive_limit it is a ceiling, and each server's own limit is learned under it; without, set it to what the server can run at once (Tomcat's maxThreads). Past it, requests wait in the service's queue.";
    "services.NAME.admission" "adaptive_limit": "boolean" = "false", "Off by default for now (it is being proven under deploys); when true: learn each server's concurrency limit from its answers, with no tuning: it grows while latency stays within twice the server's unloaded latency, shrinks as latency rises and on overload answers (503, 429, refused connections), drops to 1 when the server stops answering (a stall), and never passes server_in_flight_max. It is enforced once the server shows overload (an overload answer or a stall) and until 30 s passed without one and demand stayed under it for 5 s; before that the ceiling applies, so that latency rising with a busy CPU costs no throughput. It bounds requests awaiting their response head (a streamed body counts only against server_in_flight_max). status, GET /pools and the metric nonstop_server_limit show each server's limit and why it last moved.";
    "services.NAME.admission" "queue_length_max": "integer" = "4096", "Requests waiting at most; past it, 503 with Retry-After at once.";
    "services.NAME.admission" "queue_wait_ms_max": "integer" = "10000", "Longest wait in the queue, also while no server is ready at all (all restarting): the request is held until a server comes back. Past it: 503 with Retry-After.";
    "services.NAME.admission" "overload_wait_ms_max": "integer" = "1000", "While servers are up but all full (overload), a request whose expected wait (from the queue's length, the servers' slots and their recent latency) is longer gets 503 with Retry-After at once (load shedding): capacity is not coming back, so a longer queue only adds latency. Not within the longest wait after a request arrived while no server was serving: the queue may still hold that outage's backlog, which drains once the servers are back, however slow they are at first.";

    "services.NAME.app" "driver": "string" = "\"process\"", "How instances run: \"process\" (a child process of the proxy, from command), \"docker\" (a container of image on the local Docker engine, its container_port published on 127.0.0.1 at the instance's port) or \"ssh\" (a process on each of hosts, started over SSH from command in the shipped release, listening on the host's address; see docs/hosts.md).";
    "services.NAME.app" "command": "string" = "", "The command of one instance, run by sh -c with exec. {addr}, {host}, {port}, {version} and {instance} are replaced, e.g. \"{nonstop} app --listen {addr} --version {version}\"; with the process driver, {nonstop} is replaced by the path of the running nonstop binary itself (shell-quoted when needed), so the sample app runs without nonstop on PATH. Required with the process and ssh drivers (with ssh, it runs on the host in the release directory, and {addr} is the host's address); not taken by the docker driver (see image and args).";
    "services.NAME.app" "image": "string" = "", "Docker driver: the image of an instance, {version} replaced, e.g. \"nonstop-app:{version}\". It must be on the local engine (nothing is pulled). Required with the docker driver.";
    "services.NAME.app" "args": "array of strings" = "[]", "Docker driver: the arguments to the image's entry point ({version} and {instance} replaced); empty: the image's own CMD.";
    "services.NAME.app" "container_port": "integer" = "9001", "Docker driver: the port the app listens on inside its container.";
    "services.NAME.app" "volumes": "array of strings" = "[]", "Docker driver: bind mounts of every instance, \"HOST_DIR:CONTAINER_DIR\" or with \":ro\", both absolute (for instances that share a SQLite database, say).";
    "services.NAME.app" "labels": "table of strings" = "{}", "Docker driver: extra labels on every container, besides nonstop.service, nonstop.version, nonstop.instance and nonstop.state.";
    "services.NAME.app" "keep_versions": "integer" = "2", "Docker driver: the stopped containers of this many replaced versions are kept (for logs, inspection and a quick manual restart); older ones are removed, the newest replaced version never. Every container is removed when the proxy shuts down.";
    "services.NAME.app" "hosts": "array of strings" = "", "SSH driver: the [hosts.NAME] the instances run on, count on each, such as [\"web1\", \"web2\"]. Required with the ssh driver. Docker driver: the hosts whose Docker engines run the containers, count on each, driven over SSH; the image is shipped to a host that lacks it (docker save, then docker load there, its ID checked), and each container's port is published on the host's address. Absent with the docker driver: the local engine.";
    "services.NAME.app" "release": "path" = "", "SSH driver: the file or directory ({version} replaced) shipped to each host once per version, before its instances start: streamed over the host's SSH connection, checked by SHA-256 and renamed into place as dir/releases/VERSION, where command runs. Absent: nothing is shipped and command runs in the host's dir.";
    "services.NAME.app" "keep_releases": "integer" = "3", "SSH driver: releases kept on each host for a rollback; older ones are removed after a successful deploy, never the one serving or the one it replaced.";
    "services.NAME.app" "version": "string" = "\"v1\"", "The version started the first time; afterwards the last deployed version (kept in state_dir) is started.";
    "services.NAME.app" "env": "table of strings" = "{}", "Environment variables of every instance, on top of the proxy's own (process driver) or the image's (docker driver); values take the same {placeholders} as command ({nonstop} unquoted).";
    "services.NAME.app" "dir": "path" = "", "Process driver: working directory of the instances. Absent: the proxy's.";
    "services.NAME.app" "ports": "string" = "", "The port range instances listen on, such as \"9101-9120\", on 127.0.0.1 (with the ssh driver, on each host's address). A deploy needs free ports for the new instances while the old ones run: at least count + max_surge for rolling, twice count for blue-green and canary. Required.";
    "services.NAME.app" "count": "integer" = "3", "Instances that serve at once (with the ssh driver, on each host).";
    "services.NAME.app" "health_path": "string" = "\"/health\"", "Readiness: an instance takes traffic only once GET of this path has answered 2xx ready_passes times in a row.";
    "services.NAME.app" "ready_passes": "integer" = "3", "Consecutive passing readiness checks an instance needs.";
    "services.NAME.app" "ready_interval_ms": "integer" = "200", "Time between two readiness checks of a starting instance.";
    "services.NAME.app" "ready_timeout_ms": "integer" = "30000", "An instance not ready within this long fails the deploy (one that exits fails it at once).";
    "services.NAME.app" "strategy": "string" = "\"rolling\"", "The default deploy strategy: \"rolling\", \"blue-green\" or \"canary\".";
    "services.NAME.app" "max_surge": "integer" = "1", "Rolling: instances started beyond count at once.";
    "services.NAME.app" "max_unavailable": "integer" = "0", "Rolling: instances that may be out of service at once. max_surge + max_unavailable is at least 1.";
    "services.NAME.app" "canary_steps": "array of integers" = "[10, 50, 100]", "Canary: the new version's share of requests at each step, percent, rising, ending at 100.";
    "services.NAME.app" "step_ms": "integer" = "5000", "Canary: how long each step runs (and is analysed) before the next.";
    "services.NAME.app" "soak_ms": "integer" = "10000", "After the cutover, how long the new version is watched before the old instances (kept warm until then for a rollback) are stopped.";
    "services.NAME.app" "error_rate_margin_percent": "integer" = "5", "Analysis: the new version fails when its share of failed tries (5xx, timeouts, resets) passes the old version's by more than this many points, and by more than chance (a two-proportion z-test, 3 standard errors).";
    "services.NAME.app" "p99_max_percent": "integer" = "300", "Analysis: the new version fails when its p99 latency passes this percentage of the old version's p99 (over the same time, so that a busy machine slows both alike)";
    "services.NAME.app" "p99_slack_ms": "integer" = "250", "and the old p99 plus this many milliseconds.";
    "services.NAME.app" "analysis_requests_min": "integer" = "20", "Analysis judges the new version only after it answered this many requests (crashes fail it at once).";
    "services.NAME.app" "drain_timeout_ms": "integer" = "30000", "How long an old instance may take to finish its in-flight requests before it is stopped anyway.";
    "services.NAME.app" "stop_grace_ms": "integer" = "10000", "After SIGTERM, how long an instance may take to exit before SIGKILL.";
    "services.NAME.app" "restart_backoff_base_ms": "integer" = "500", "A crashed instance is restarted after this long, doubled after each crash in a row.";
    "services.NAME.app" "restart_backoff_max_ms": "integer" = "30000", "The longest wait before a restart.";
    "services.NAME.app" "log_bytes_max": "integer" = "10485760", "An instance log (state_dir/logs/SERVICE-ID.log, its standard output and error) is rotated once larger than this: when the instance (re)starts the file is renamed to SERVICE-ID.log.1 (older ones shifted to .2 and so on); while it runs, the supervisor checks the size every second and copies the file to .1, then truncates it (the instance appends, so it goes on writing at the start of the emptied file; a line written between the copy and the truncation is lost). Process and docker drivers.";
    "services.NAME.app" "log_files_max": "integer" = "5", "Rotated logs kept per instance (SERVICE-ID.log.1 to .N); older ones are removed. 0: an oversized log is emptied and nothing is kept.";

    "queues.NAME" "store": "string" = "\"embedded\"", "Where requests are kept: \"embedded\" (a redb file, fsynced before each 202, many requests per fsync) or \"rabbitmq\" (a quorum queue several nonstop nodes can share; each 202 after the broker's publisher confirm; statuses stay in the embedded store at path).";
    "queues.NAME" "rabbitmq_url": "string" = "\"amqp://guest:guest@127.0.0.1:5672/%2f\"", "With store = \"rabbitmq\": the broker. The queues are nonstop.NAME (quorum), nonstop.NAME.retry (back-off) and nonstop.NAME.dead (dead letters).";
    "queues.NAME" "path": "string" = "\"./nonstop-data\"", "Directory of the embedded store, created owner-only (0700); the queue's file is NAME.redb in it, 0600 (it holds pending requests' headers, Authorization and Cookie included). NAME is 1 to 64 characters of [A-Za-z0-9_-].";
    "queues.NAME" "length_max": "integer" = "100000", "Requests waiting for delivery at most; past it, 503 with Retry-After.";
    "queues.NAME" "bytes_max": "integer" = "1073741824", "Bytes of requests waiting for delivery at most; past it, 503 with Retry-After.";
    "queues.NAME" "batch_max": "integer" = "1024", "Group commit: store operations written per commit (one fsync) at most.";
    "queues.NAME" "concurrency": "integer" = "16", "Deliveries to the service at once.";
    "queues.NAME" "attempts_max": "integer" = "10", "Deliveries of one request at most; after the last failure it is a dead letter.";
    "queues.NAME" "backoff_base_ms": "integer" = "500", "Wait after the first failed delivery; it doubles with each failure (half of it random).";
    "queues.NAME" "backoff_max_ms": "integer" = "60000", "Longest wait between two deliveries of one request.";
    "queues.NAME" "status_body": "boolean" = "false", "Whether the public status (GET /_nonstop/requests/{id}) shows the service's answer body and the last delivery's error text (which can name a server). Off: only its status code, and \"no answer\" for an error; the whole record is on the admin API (nonstop queue show QUEUE.KEY or QUEUE.N).";
    "queues.NAME" "body_bytes_in_flight_max": "integer" = "67108864", "Bytes of request bodies being received for this queue at once, across all connections, at most (a declared Content-Length is counted before any byte is read); past it, 503 with Retry-After. At least the body_bytes_max of every route using the queue. A body must arrive within its listener's header_read_timeout_ms, or 408.";
    "queues.NAME" "finished_keep_max": "integer" = "100000", "Statuses of finished requests (done, and failed with their request for replay) kept at most; past it the oldest finished are deleted, and their ids answer 404. Queued requests and dead letters are never deleted by it. 0 keeps none.";
    "queues.NAME" "finished_keep_ms": "integer" = "604800000", "How long the status of a finished request (done or failed) is kept after it finished (default 7 days); then it is deleted, within a minute.";
    "queues.NAME" "deliver_window": "table" = "", "Deliver only inside a window: { schedule = \"0 0 1 * * *\", duration_ms = 7200000, time_zone = \"Asia/Seoul\" }. Requests are accepted and stored at any time and delivered, each once, while the window is open; a delivery in progress when it closes finishes, retries wait for the next opening. With store = \"rabbitmq\" they wait in the broker's queue, consumed only while the window is open. Absent: always.";

    "hosts.NAME" "address": "string" = "", "\"IP or name:port\", such as \"10.0.0.5:22\" or \"web1.example.com\" (port 22 when absent; an IPv6 address with a port in brackets, \"[2001:db8::5]:2222\"). Required.";
    "hosts.NAME" "user": "string" = "\"root\"", "The user nonstop logs in as (root, as Kamal's default; set a deploy user that may run docker and write dir).";
    "hosts.NAME" "identity": "path" = "", "The private key nonstop authenticates with [default: state_dir/ssh/id_ed25519, made by nonstop keys init].";
    "hosts.NAME" "dir": "string" = "\"~/nonstop\"", "The release directory on the host; it must be writable by user (~/ is the user's home).";
    "hosts.NAME" "connect_timeout_ms": "integer" = "5000", "Connecting, the SSH handshake and authentication together take at most this long; a dead host costs this, not the other hosts' time.";
    "hosts.NAME" "max_startups": "integer" = "10", "SSH handshakes nonstop starts to this host at once (sshd's MaxStartups defaults to 10). nonstop hosts check starts at most the smallest max_startups of all hosts at once.";
    "hosts.NAME" "max_sessions": "integer" = "10", "Channels (commands) open at once on the one connection to this host (sshd's MaxSessions defaults to 10).";

    "pipelines.NAME" "repo": "string" = "", "The git repository: any URL or path git fetch takes. Required.";
    "pipelines.NAME" "branch": "string" = "\"main\"", "The branch a run builds by default, and the only one whose pushes start runs.";
    "pipelines.NAME" "file": "string" = "", "A pipeline file in the repository (its stages and post, read from the commit being built) instead of stages here.";
    "pipelines.NAME" "stages": "array of tables" = "", "The stages, run in order (see [stages[]]). Required unless file is set.";
    "pipelines.NAME" "post": "array of tables" = "", "Steps run after the stages, on success, failure or always (see [post[]]).";
    "pipelines.NAME" "env": "table of strings" = "{}", "Environment variables of every step.";
    "pipelines.NAME" "secrets": "table of tables" = "", "Secrets by the environment variable name the steps see: NAME = { file = \"PATH\" } or { env = \"VAR\" } (read when a run starts). Their values are masked as *** in every log, a multi-line value line by line, and their base64 form too.";
    "pipelines.NAME" "keep_runs": "integer" = "50", "Runs kept with their logs; older runs are deleted, with the artifacts no kept run or deployed version uses.";
    "pipelines.NAME" "concurrency": "string" = "\"queue\"", "A trigger while a run runs: \"queue\" (at most one waits; a newer trigger replaces it, which ends superseded), \"forbid\" (the trigger is recorded as skipped) or \"cancel\" (the running run is cancelled, the new one starts when it ended).";
    "pipelines.NAME" "webhook": "table" = "", "The push webhook POST /hooks/NAME on the admin listener, signed with HMAC-SHA256 (GitHub, Gitea) or carrying the secret (GitLab): { secret_env = \"VAR\" } or { secret_file = \"PATH\" }. Absent: no webhook.";
    "pipelines.NAME" "schedule": "string" = "", "Cron: 5 fields (minute hour day month weekday) or 6 (seconds first), with Jenkins' H (spread by a hash of the name: H, H(0-7), H/15) and @hourly, @daily, @midnight, @weekly, @monthly, @yearly. Absent: no schedule.";
    "pipelines.NAME" "time_zone": "string" = "\"UTC\"", "The IANA time zone of schedule, such as \"Asia/Seoul\".";
    "pipelines.NAME" "missed": "string" = "\"run_once\"", "Fire times missed while nonstop was not running: \"run_once\" (one run at start for all of them) or \"skip\".";
    "pipelines.NAME" "after": "array of strings" = "[]", "Pipelines whose successful run starts a run of this one.";
    "pipelines.NAME" "timeout_ms": "integer" = "3600000", "A whole run takes at most this long; then it is cancelled and fails.";
    "pipelines.NAME" "log_bytes_max": "integer" = "1048576", "Stored log bytes per step at most; the rest is counted and dropped.";

    "pipelines.NAME.webhook" "secret_env": "string" = "", "The environment variable of nonstop serve that holds the webhook secret.";
    "pipelines.NAME.webhook" "secret_file": "path" = "", "A file that holds the webhook secret (one trailing newline is not part of it).";

    "pipelines.NAME.secrets.NAME" "file": "path" = "", "A file that holds the secret (one trailing newline is not part of it).";
    "pipelines.NAME.secrets.NAME" "env": "string" = "", "An environment variable of nonstop serve that holds the secret.";

    "pipeline file" "stages": "array of tables" = "", "In a pipeline file kept in the repository (pipelines.NAME.file): the stages, as pipelines.NAME.stages. Required.";
    "pipeline file" "post": "array of tables" = "", "In a pipeline file: the post steps, as pipelines.NAME.post.";

    "stages[]" "name": "string" = "", "The stage's name [default: stageN].";
    "stages[]" "steps": "array of tables" = "", "Its steps, run in order (see [stages[].steps[]]). Required.";

    "stages[].steps[]" "name": "string" = "", "The step's name, unique in its stage [default: run, deploy or verify].";
    "stages[].steps[]" "run": "string" = "", "A shell command (sh -c) run in the run's workspace, in a process group of its own. A step is one of run, deploy or verify.";
    "stages[].steps[]" "deploy": "string" = "", "An app service to deploy through the running proxy, to version; fails the run when the deploy fails or rolls back.";
    "stages[].steps[]" "verify": "string" = "", "A service to run nonstop load against (url, rate, duration_ms, thresholds); a failed threshold rolls it back to the version before the run's deploy and fails the run.";
    "stages[].steps[]" "env": "table of strings" = "{}", "Environment variables of this step, on top of the pipeline's.";
    "stages[].steps[]" "timeout_ms": "integer" = "3600000", "A try of the step takes at most this long; then its process group gets SIGTERM, and SIGKILL 5 s later.";
    "stages[].steps[]" "retries": "integer" = "0", "Tries after a failed one (non-zero exit, timeout) at most.";
    "stages[].steps[]" "when": "table" = "", "Run the step only for these: { branch = [\"main\"], trigger = [\"push\", \"manual\", \"schedule\", \"after\"] }; otherwise it is skipped.";
    "stages[].steps[]" "artifacts": "array of strings" = "[]", "Files or directories (relative to the workspace) kept, by content hash, after the step succeeded.";
    "stages[].steps[]" "version": "string" = "\"{commit}\"", "Deploy: the version, a template of {commit} (12 hex digits), {run} and {branch}.";
    "stages[].steps[]" "artifact": "string" = "", "Deploy: an artifact of an earlier step; its kept path is NONSTOP_ARTIFACT in the new instances' environment.";
    "stages[].steps[]" "strategy": "string" = "", "Deploy: the strategy [default: the service's].";
    "stages[].steps[]" "url": "string" = "", "Verify: the URL to load [default: the first listener, with the path of the service's first route].";
    "stages[].steps[]" "rate": "integer" = "20", "Verify: requests a second.";
    "stages[].steps[]" "duration_ms": "integer" = "5000", "Verify: how long the load runs.";
    "stages[].steps[]" "thresholds": "array of strings" = "[\"error_rate<1%\"]", "Verify: thresholds, as nonstop load --threshold takes them (p99<300ms, error_rate<1%).";

    "stages[].steps[].when" "branch": "array of strings" = "[]", "Branches the step runs for; empty: all.";
    "stages[].steps[].when" "trigger": "array of strings" = "[]", "Triggers the step runs for (push, manual, schedule, after); empty: all.";

    "post[]" "on": "string" = "", "When the step runs: \"success\", \"failure\" or \"always\". Required. Its result does not change the run's.";
    "post[]" "name": "string" = "", "The step's name [default: run].";
    "post[]" "run": "string" = "", "A shell command, as in stages[].steps[] (deploy and verify steps may be post steps too).";
    "post[]" "deploy": "string" = "", "As in stages[].steps[].";
    "post[]" "verify": "string" = "", "As in stages[].steps[].";
    "post[]" "env": "table of strings" = "{}", "As in stages[].steps[].";
    "post[]" "timeout_ms": "integer" = "3600000", "As in stages[].steps[].";
    "post[]" "retries": "integer" = "0", "As in stages[].steps[].";
    "post[]" "when": "table" = "", "As in stages[].steps[].";
    "post[]" "artifacts": "array of strings" = "[]", "As in stages[].steps[].";
    "post[]" "version": "string" = "\"{commit}\"", "As in stages[].steps[].";
    "post[]" "artifact": "string" = "", "As in stages[].steps[].";
    "post[]" "strategy": "string" = "", "As in stages[].steps[].";
    "post[]" "url": "string" = "", "As in stages[].steps[].";
    "post[]" "rate": "integer" = "20", "As in stages[].steps[].";
    "post[]" "duration_ms": "integer" = "5000", "As in stages[].steps[].";
    "post[]" "thresholds": "array of strings" = "[\"error_rate<1%\"]", "As in stages[].steps[].";

    "post[].when" "branch": "array of strings" = "[]", "As in stages[].steps[].when.";
    "post[].when" "trigger": "array of strings" = "[]", "As in stages[].steps[].when.";

    "jobs.NAME" "schedule": "string" = "", "When the job runs: cron, as pipelines.NAME.schedule. Absent: only by hand (nonstop run NAME).";
    "jobs.NAME" "time_zone": "string" = "\"UTC\"", "The IANA time zone of schedule.";
    "jobs.NAME" "missed": "string" = "\"run_once\"", "Fire times missed while nonstop was not running: \"run_once\" or \"skip\".";
    "jobs.NAME" "command": "string" = "", "The shell command (sh -c). Required.";
    "jobs.NAME" "dir": "path" = "", "Where the command runs [default: a fresh directory of the run's own; on a host, the host's dir]. On a host, a path there (~/ is the login's home).";
    "jobs.NAME" "host": "string" = "", "Run the command on this SSH host (a [hosts.NAME]) instead of this machine: over SSH, in a session of its own there, its output streamed into the run's log; a timeout or cancel ends its whole process group on the host, and a run an earlier nonstop left going there is killed before the next starts. Absent: on this machine.";
    "jobs.NAME" "env": "table of strings" = "{}", "Environment variables of the command.";
    "jobs.NAME" "secrets": "table of tables" = "", "Secrets, as pipelines.NAME.secrets: in the environment, masked in the log.";
    "jobs.NAME" "timeout_ms": "integer" = "3600000", "A run takes at most this long; then its process group gets SIGTERM, and SIGKILL 5 s later.";
    "jobs.NAME" "keep_runs": "integer" = "100", "Runs kept with their logs.";
    "jobs.NAME" "log_bytes_max": "integer" = "1048576", "Stored log bytes per run at most.";

    "queues.NAME.deliver_window" "schedule": "string" = "", "When the window opens: cron, as pipelines.NAME.schedule. Required.";
    "queues.NAME.deliver_window" "duration_ms": "integer" = "", "How long it stays open. Required.";
    "queues.NAME.deliver_window" "time_zone": "string" = "\"UTC\"", "The IANA time zone of schedule.";

    "admin" "listen": "address" = "\"127.0.0.1:9900\"", "Address of the admin API.";
    "admin" "token": "string" = "", "Bearer token the admin API requires. Required when listen is not a loopback address.";

    "access_log" "enabled": "boolean" = "true", "Write one JSON line per request. When path is \"-\" and standard output is a terminal, the access log is off unless enabled = true is written here: as with nginx, requests are not echoed to the terminal (set path to log to a file, or pipe standard output).";
    "access_log" "path": "string" = "\"-\"", "File to append to; \"-\" is standard output.";
    "access_log" "format": "string" = "\"json\"", "\"json\": one JSON object per line (ts_ms, listener, client, method, host, path, status, service, server, duration_ms, attempts, queue_wait_ms, shed, error). \"combined\": nginx's combined format (the body size is written as -).";
    "access_log" "flush_ms": "integer" = "1000", "Buffered lines are written at least this often (and whenever a thread's 64 KiB buffer fills).";
    "access_log" "success_sample_percent": "integer" = "100", "Share of answers below 400 that are logged; errors (400 and above) always are.";
}

/// Looks a key up.
pub fn key(section: &str, name: &str) -> Option<&'static Key> {
    SCHEMA.iter().find(|k| k.section == section && k.name == name)
}

/// The keys of one section, for "expected one of" messages.
pub fn names(section: &str) -> Vec<&'static str> {
    SCHEMA.iter().filter(|k| k.section == section).map(|k| k.name).collect()
}

/// docs/config.md, generated from [`SCHEMA`].
pub fn reference_markdown() -> String {
    let mut out = String::from(
        "# Configuration reference\n\n\
         <!-- Generated from crates/config/src/schema.rs by `nonstop config-reference`; do not edit by hand. -->\n\n\
         `nonstop serve --config FILE` reads one TOML file; `nonstop check --config FILE` validates it and prints \
         every error with its line (each bad item of an array, and the first byte that is not UTF-8, too), then \
         what `serve` would still stop at when it starts: a TLS certificate or key that is missing or invalid, an \
         access log file that cannot be written, a state_dir that is not a directory (it binds no address, so it \
         can check the file of a running proxy). Unknown keys are errors. Durations are integers in milliseconds (`_ms`), sizes \
         in bytes (`_bytes`).\n\n\
         Quick mode (`nonstop serve --listen ADDR --to ADDR ... [--balance ALG] [--admin ADDR]`) builds the same \
         config with one listener, one route `/` and one service `default`, so it has the same defaults.\n",
    );
    let mut section = None;
    for k in SCHEMA {
        if section != Some(k.section) {
            section = Some(k.section);
            let title = if k.section.is_empty() { "Top level".to_string() } else { format!("`[{}]`", k.section) };
            out.push_str(&format!("\n## {title}\n\n| key | type | default | meaning |\n|---|---|---|---|\n"));
        }
        let default = if k.default.is_empty() { "-".to_string() } else { format!("`{}`", k.default) };
        out.push_str(&format!("| `{}` | {} | {} | {} |\n", k.name, k.ty, default, k.doc));
    }
    out
}
