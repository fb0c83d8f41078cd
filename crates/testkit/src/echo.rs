//! An echo backend on a real loopback socket, for proxy tests: it reports what it received and can stream,
//! stall, and accept upgrades.
//!
//! - `GET /headers`: the request's headers as a JSON object (repeated headers joined by ", ").
//! - `POST /count`: reads the body as a stream and answers `{"bytes": N}`.
//! - `GET /stream?bytes=N`: streams N bytes in 64 KiB chunks.
//! - `GET /slow?ms=N`: answers after N ms.
//! - `GET /events`: server-sent events, one every 100 ms, without end.
//! - any request with `Upgrade`: 101, then echoes bytes back.
//! - anything else: 200 `{"server": NAME}`.
//!
//! Every response names the request's HTTP version in `x-echo-version`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

fn query_num(req: &Request<Incoming>, key: &str) -> u64 {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn handle(name: String, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.headers().contains_key(http::header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut resp = Response::new(full(""));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().insert("upgrade", "echo".parse().unwrap());
        resp.headers_mut().insert("connection", "upgrade".parse().unwrap());
        return Ok(resp);
    }
    let path = req.uri().path().to_string();
    let version = req.version();
    let resp = match path.as_str() {
        "/headers" => {
            let mut map = serde_json::Map::new();
            for name in req.headers().keys() {
                let joined: Vec<&str> = req.headers().get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
                map.insert(name.to_string(), joined.join(", ").into());
            }
            Response::new(full(serde_json::Value::Object(map).to_string()))
        }
        "/count" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            Response::new(full(format!("{{\"bytes\":{n}}}")))
        }
        "/stream" => {
            let total = query_num(&req, "bytes");
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_lite::stream::unfold(0u64, move |sent| {
                let chunk = chunk.clone();
                async move {
                    (sent < total).then(|| {
                        let n = (total - sent).min(chunk.len() as u64);
                        (Ok::<_, Infallible>(Frame::data(chunk.slice(..n as usize))), sent + n)
                    })
                }
            });
            Response::new(StreamBody::new(stream).boxed())
        }
        "/events" => {
            let stream = futures_lite::stream::unfold(0u64, |n| async move {
                tokio::time::sleep(Duration::from_millis(if n == 0 { 0 } else { 100 })).await;
                Some((Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: tick {n}\n\n")))), n + 1))
            });
            let mut r = Response::new(StreamBody::new(stream).boxed());
            r.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_num(&req, "ms"))).await;
            Response::new(full(format!("{{\"server\":\"{name}\"}}")))
        }
        _ => Response::new(full(format!("{{\"server\":\"{name}\"}}"))),
    };
    let mut resp = resp;
    resp.headers_mut().insert("x-echo-version", format!("{version:?}").parse().unwrap());
    resp.headers_mut().insert("server", "echo/1".parse().unwrap());
    resp.headers_mut().insert("x-nonstop-instance", name.parse().unwrap());
    Ok(resp)
}

/// Starts an echo backend named `name` on 127.0.0.1 with an OS-assigned port, serving HTTP/1.1 and h2c.
pub async fn start(name: &str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().unwrap();
    let name = name.to_string();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let name = name.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(name.clone(), req));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}
