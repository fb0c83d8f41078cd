//! Integration tests on the machine's real Docker engine: images of the real binary built offline by
//! `scripts/image`, and containers reached over the network.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use nonstop_testkit::docker::{docker, Container, Image};
use nonstop_testkit::{get, post_json, wait_for_status};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

/// Waits until the app in `container` answers `GET /health` with 200 at `addr`, with its logs on failure.
async fn ready(container: &Container, addr: SocketAddr) {
    if !wait_for_status(addr, "/health", 200, Duration::from_secs(20)).await {
        panic!("the app in {} never became ready at {addr}: {}", container.name, container.logs());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_nonstop_app_reachable_over_the_network_and_is_removed() {
    let version = format!("ct{}", std::process::id());
    let image = Image::build(bin(), &version);
    // A rebuild of the same binary comes from the build cache: the same image id.
    let id = docker(&["image", "inspect", "-f", "{{.Id}}", &image.tag]);
    let again = Image::build(bin(), &version);
    assert_eq!(docker(&["image", "inspect", "-f", "{{.Id}}", &again.tag]), id);
    std::mem::forget(again); // the same tag: one removal, by `image`

    // `docker run --rm IMAGE app --help`, the issue's check, from inside the image.
    let help = docker(&["run", "--rm", &image.tag, "app", "--help"]);
    assert!(help.contains("--workers") && help.contains("--listen"), "app --help in the image: {help}");

    let name;
    {
        let c = Container::run(&image.tag, "app", &["-p", "127.0.0.1::9001"], &["app", "--workers", "4"]);
        name = c.name.clone();
        let published = c.published(9001);
        ready(&c, published).await;
        // The image's version is the tag's: scripts/image bakes it into the app's environment.
        let r = get(published, "/").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-nonstop-version"), Some(version.as_str()));
        let created =
            post_json(published, "/orders", &[("idempotency-key", "ct-1")], r#"{"item":"book","qty":2}"#).await;
        assert_eq!(created.status, 201, "{:?}", created.body);

        // The same container on its own address on the bridge network, as a proxy in another container sees it.
        let ip = c.bridge_ip();
        let direct: SocketAddr = format!("{ip}:9001").parse().unwrap_or_else(|e| panic!("bridge address {ip:?}: {e}"));
        ready(&c, direct).await;
        let count = get(direct, "/orders/count").await.json();
        assert_eq!(count["count"], 1, "the order written through the published port is in the container's store");
        assert!(c.running());
    }
    // Dropping the handle removed the container.
    let left = docker(&["ps", "-a", "-q", "--filter", &format!("name=^{name}$")]);
    assert_eq!(left, "", "container {name} was not removed");
}
