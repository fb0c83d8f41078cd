//! Integration tests of `nonstop app` on the real PostgreSQL server of this machine (127.0.0.1:5432, trust auth,
//! database `test`). Each test works in a schema of its own, dropped at the end.

use std::path::Path;

use nonstop_testkit::{concurrent_keyed_posts, get, post_json, Proc};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

const SERVER: &str = "postgres://root@127.0.0.1:5432/test";

/// A schema of the test's own; the app's `orders` table lands in it through `search_path`.
struct Schema {
    name: String,
    client: tokio_postgres::Client,
}

impl Schema {
    async fn new(tag: &str) -> Schema {
        let (client, conn) = tokio_postgres::connect(SERVER, tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL must run on 127.0.0.1:5432 (.ci/run starts it)");
        tokio::spawn(conn);
        let name = format!("nonstop_{tag}_{}", std::process::id());
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}")).await.unwrap();
        Schema { name, client }
    }

    fn url(&self) -> String {
        format!("{SERVER}?options=-csearch_path%3D{}", self.name)
    }

    async fn rows(&self) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {}.orders", self.name);
        self.client.query_one(&sql, &[]).await.unwrap().get(0)
    }

    async fn drop_schema(self) {
        self.client.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name)).await.unwrap();
    }
}

fn app(url: &str, instance: &str) -> Proc {
    Proc::start(bin(), &["app", "--listen", "127.0.0.1:0", "--db", url, "--instance", instance])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_on_postgres() {
    let schema = Schema::new("orders").await;
    let p = app(&schema.url(), "pg-1");
    assert_eq!(get(p.addr, "/stats").await.json()["db"], "postgres");
    let r = post_json(p.addr, "/orders", &[], r#"{"item":"book","qty":3}"#).await;
    assert_eq!(r.status, 201);
    let order = r.json();
    let id = order["id"].as_i64().unwrap();
    assert_eq!(order["instance"], "pg-1");
    assert_eq!(get(p.addr, &format!("/orders/{id}")).await.json(), order);
    assert_eq!(get(p.addr, "/orders/count").await.json()["count"], 1);
    assert_eq!(get(p.addr, "/orders/424242").await.status, 404);
    for (body, field) in [(r#"{"item":"book","qty":0}"#, "qty"), (r#"{"qty":1}"#, "item"), ("{", "body")] {
        let r = post_json(p.addr, "/orders", &[], body).await;
        assert_eq!((r.status, r.json()["field"].as_str()), (400, Some(field)), "{body}");
    }
    assert_eq!(schema.rows().await, 1);
    drop(p);
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_holds_across_two_instances_on_postgres() {
    let schema = Schema::new("idem").await;
    let (a, b) = (app(&schema.url(), "a"), app(&schema.url(), "b"));
    let body = r#"{"item":"lamp","qty":2}"#;
    let answers = concurrent_keyed_posts(&[a.addr, b.addr], "/orders", "pg-order-1", body, 20).await;
    let mut ids = std::collections::BTreeSet::new();
    for r in answers {
        assert_eq!(r.status, 201, "{:?}", r.body);
        ids.insert(r.json()["id"].as_i64().unwrap());
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(schema.rows().await, 1);
    let r = post_json(a.addr, "/orders", &[("idempotency-key", "pg-order-1")], r#"{"item":"lamp","qty":9}"#).await;
    assert_eq!((r.status, r.json()["field"].as_str()), (422, Some("Idempotency-Key")));
    let r = post_json(b.addr, "/orders", &[("idempotency-key", "pg-order-2")], body).await;
    assert_eq!(r.status, 201);
    assert_eq!(schema.rows().await, 2);
    drop((a, b));
    schema.drop_schema().await;
}
