//! What the server says about itself: STATS and Prometheus `/metrics` move when their
//! events happen (on both backends), a real Prometheus scrapes them, and `/metrics`
//! survives bad requests and floods of scrapes without disturbing serving.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use netswap_proto::*;
use netswap_server::{RunningServer, ServerConfig};

fn metrics_server(
    backend: Backend,
    tweak: impl FnOnce(&mut ServerConfig),
) -> (RunningServer, SocketAddr) {
    // Port 0: the server binds /metrics where the OS says (a port picked by the test
    // and bound later could be taken by another test in between).
    let srv = server_on(backend, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        tweak(c);
    });
    let addr = srv.metrics_addr().expect("serves /metrics");
    (srv, addr)
}

async fn stats(c: &mut Raw) -> HashMap<String, u64> {
    match c.ask(Request::Stats).await {
        Reply::Stats(s) => s.into_iter().collect(),
        r => panic!("{r:?}"),
    }
}

async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not within 10 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn requests_bytes_connections_and_records_are_counted(backend: Backend) {
    let (srv, m) = metrics_server(backend, |_| {});
    let mut a = Raw::connect(srv.addr(), 2).await;
    let before = stats(&mut a).await;
    let p = a.create(Access::READ, &b"twelve bytes"[..]).await;
    assert_eq!(a.read(p).await, data(b"twelve bytes"));
    let bad = a
        .call(Request::Read {
            ptr: Pointer::new(12345).unwrap(),
            range: None,
        })
        .await;
    assert_eq!(bad.status(), Status::AddressFault);
    let after = stats(&mut a).await;
    assert_eq!(after["requests_create"], before["requests_create"] + 1);
    assert_eq!(after["requests_read"], before["requests_read"] + 2);
    assert!(after["bytes_in"] > before["bytes_in"] && after["bytes_out"] > before["bytes_out"]);
    assert_eq!(after["connections"], 1);
    assert!(after["connections_accepted"] >= 1);
    assert_eq!(after["misses"], before["misses"] + 1);
    if backend == Backend::Memory {
        assert_eq!((after["your_records"], after["your_bytes"]), (1, 12));
    }
    let mm = scrape(m);
    assert_eq!(
        metric(&mm, r#"netswap_requests_total{op="CREATE",status="OK"}"#),
        1.0
    );
    assert_eq!(
        metric(&mm, r#"netswap_requests_total{op="READ",status="DATA"}"#),
        1.0
    );
    assert_eq!(
        metric(
            &mm,
            r#"netswap_requests_total{op="READ",status="ADDRESS_FAULT"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(&mm, r#"netswap_request_duration_seconds_count{op="READ"}"#),
        2.0
    );
    assert!(
        metric(
            &mm,
            r#"netswap_request_duration_seconds_bucket{op="READ",le="+Inf"}"#
        ) == 2.0
    );
    assert!(metric(&mm, "netswap_received_bytes_total") > 0.0);
    assert_eq!(metric(&mm, "netswap_connections"), 1.0);
    assert_eq!(metric(&mm, "netswap_pointer_misses_total"), 1.0);
    // Records and bytes (with Redis Cluster: counted on demand, so soon).
    eventually("records and bytes are counted", async || {
        let mm = scrape(m);
        metric(&mm, "netswap_records") == 1.0 && metric(&mm, "netswap_data_bytes") == 12.0
    })
    .await;
    // A refused connection (over the per-address limit).
    drop(a);
    srv.stop().unwrap();
}

async fn watches_notifications_and_orphans_are_counted(backend: Backend) {
    let (srv, m) = metrics_server(backend, |c| c.store.orphan_grace = Duration::from_secs(1));
    let mut owner = Raw::connect(srv.addr(), 2).await;
    let mut watcher = Raw::connect(srv.addr(), 3).await;
    let p = owner.create(Access::READ, &b"v"[..]).await;
    watcher.send(7, &Request::watch(p)).await;
    assert_eq!(watcher.reply_to(7).await.status(), Status::Ok);
    owner
        .ask(Request::Replace {
            ptr: p,
            data: Bytes::from_static(b"w"),
        })
        .await;
    assert_eq!(watcher.reply_to(7).await.status(), Status::Notify);
    let s = stats(&mut watcher).await;
    assert_eq!(s["watches"], 1);
    assert_eq!(s["notifications_sent"], 1);
    let mm = scrape(m);
    assert_eq!(metric(&mm, "netswap_watches"), 1.0);
    assert_eq!(metric(&mm, "netswap_notifications_sent_total"), 1.0);
    // The owner leaves: its record is pending, then reaped (and the watch ends).
    drop(owner);
    eventually("an orphan is pending", async || {
        stats(&mut watcher).await["orphans_pending"] >= 1
    })
    .await;
    eventually("the orphan is reaped", async || {
        stats(&mut watcher).await["orphans_reaped"] == 1
    })
    .await;
    eventually("reaped on /metrics", async || {
        metric(&scrape(m), "netswap_orphans_reaped_total") == 1.0
    })
    .await;
    srv.stop().unwrap();
}

async fn busy_protocol_errors_and_partial_bytes_are_counted(backend: Backend) {
    let (srv, m) = metrics_server(backend, |c| c.max_connections_per_ip = 2);
    let mut a = Raw::connect(srv.addr(), 2).await;
    let p = a.create(Access::empty(), &b"x"[..]).await;
    // Half a large message: promised bytes.
    let big = Raw::frames(
        Request::Replace {
            ptr: p,
            data: Bytes::from(vec![1u8; 5000]),
        }
        .encode(40),
    );
    a.send_raw(&big[..MAX_FRAME]).await;
    eventually("partial bytes show", async || {
        stats(&mut a).await["partial_bytes"] > 0
    })
    .await;
    assert!(metric(&scrape(m), "netswap_partial_message_bytes") > 0.0);
    a.send_raw(&big[MAX_FRAME..]).await;
    assert_eq!(a.reply_to(40).await.status(), Status::Ok);
    // BUSY: a third connection from one address over the limit of 2.
    let _b = Raw::connect(srv.addr(), 2).await;
    let mut c = Raw::connect(srv.addr(), 2).await;
    let got = c.until_closed().await;
    assert_eq!(got[0].status(), Status::Busy);
    // PROTOCOL_ERROR: a frame with LEN 1391.
    let mut evil = Raw::connect(srv.addr(), 4).await;
    let mut bad = FrameHeader {
        xid: 1,
        remaining: 0,
        op: 2,
        arg: 0,
        len: 1391,
    }
    .to_bytes()
    .to_vec();
    bad.extend_from_slice(&[0u8; 1391]);
    evil.send_raw(&bad).await;
    let got = evil.until_closed().await;
    assert_eq!(got.last().unwrap().status(), Status::ProtocolError);
    let s = stats(&mut a).await;
    assert_eq!(s["protocol_errors"], 1);
    assert_eq!(s["connections_refused"], 1);
    let mm = scrape(m);
    assert_eq!(metric(&mm, "netswap_protocol_errors_total"), 1.0);
    assert_eq!(metric(&mm, "netswap_connections_refused_total"), 1.0);
    srv.stop().unwrap();
}

on_both_backends!(
    requests_bytes_connections_and_records_are_counted,
    watches_notifications_and_orphans_are_counted,
    busy_protocol_errors_and_partial_bytes_are_counted,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_notifications_and_throttled_misses_are_counted() {
    let (srv, m) = metrics_server(Backend::Memory, |c| {
        c.notify_queue = 4;
        c.max_misses_per_second = 10;
    });
    let mut owner = Raw::connect(srv.addr(), 2).await;
    let mut watcher = Raw::connect_with_recv_buffer(srv.addr(), 3, 4096).await;
    let p = owner.create(Access::READ, &b"v"[..]).await;
    watcher.send(7, &Request::watch(p)).await;
    assert_eq!(watcher.reply_to(7).await.status(), Status::Ok);
    let mut burst = Vec::new();
    for i in 0..50_000u32 {
        burst.extend_from_slice(&Raw::frames(
            Request::Replace {
                ptr: p,
                data: Bytes::new(),
            }
            .encode(100 + i),
        ));
    }
    owner.send_raw(&burst).await;
    let _ = owner.reply_to(100 + 49_999).await;
    let mut scanner = Raw::connect(srv.addr(), 5).await;
    let mut guesses = Vec::new();
    for i in 0..100u64 {
        guesses.extend_from_slice(&Raw::frames(
            Request::Info {
                ptr: Pointer::new(i + 1).unwrap(),
            }
            .encode(1000 + i as u32),
        ));
    }
    scanner.send_raw(&guesses).await;
    let _ = scanner.reply_to(1099).await;
    let s = stats(&mut scanner).await;
    assert!(s["notifications_merged"] > 0, "{s:?}");
    assert!(s["throttled"] > 0, "{s:?}");
    let mm = scrape(m);
    assert!(metric(&mm, "netswap_notifications_merged_total") > 0.0);
    assert!(metric(&mm, "netswap_pointer_misses_throttled_total") > 0.0);
    assert!(metric(&mm, "netswap_busy_replies_total") > 0.0);
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_refuse_what_is_not_a_scrape_and_a_flood_of_scrapes_does_not_disturb_serving() {
    let (srv, m) = metrics_server(Backend::Memory, |_| {});
    // Unknown paths, other methods, garbage.
    let status = |r: Result<ureq::http::Response<ureq::Body>, ureq::Error>| match r {
        Ok(r) => r.status().as_u16(),
        Err(ureq::Error::StatusCode(c)) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(status(ureq::get(format!("http://{m}/")).call()), 404);
    // Liveness and readiness for load balancers; the embedded store is always ready.
    assert_eq!(http_get(m, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(m, "/readyz"), (200, "ready\n".into()));
    assert_eq!(
        status(ureq::post(format!("http://{m}/readyz")).send("")),
        405
    );
    assert_eq!(
        status(ureq::get(format!("http://{m}/metrics/x")).call()),
        404
    );
    assert_eq!(
        status(ureq::post(format!("http://{m}/metrics")).send("")),
        405
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut g = tokio::net::TcpStream::connect(m).await.unwrap();
    g.write_all(b"\x00\x01\x02 not http at all\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), g.read_to_end(&mut reply)).await;
    assert!(
        reply.is_empty() || reply.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    // 8 scrapers as fast as they can while a client reads small records.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut scrapers = Vec::new();
    for _ in 0..8 {
        let stop = stop.clone();
        scrapers.push(std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = scrape(m);
                n += 1;
            }
            n
        }));
    }
    let mut c = Raw::connect(srv.addr(), 2).await;
    let p = c.create(Access::empty(), &b"small"[..]).await;
    let mut lat = Vec::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        let t0 = Instant::now();
        assert_eq!(c.read(p).await, data(b"small"));
        lat.push(t0.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let scrapes: u64 = scrapers.into_iter().map(|s| s.join().unwrap()).sum();
    lat.sort();
    let p99 = lat[lat.len() * 99 / 100];
    println!(
        "{} reads, p99 {:?}, during {scrapes} scrapes",
        lat.len(),
        p99
    );
    assert!(scrapes > 50, "the scrapers were served: {scrapes}");
    // Not a speed test: it must not starve (each scrape is served on its own task).
    assert!(
        p99 < Duration::from_millis(100),
        "p99 {p99:?} during a flood of scrapes"
    );
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_server() {
    let (srv, m) = metrics_server(Backend::Memory, |_| {});
    let mut c = Raw::connect(srv.addr(), 2).await;
    for _ in 0..3 {
        c.create(Access::empty(), &b"x"[..]).await;
    }
    let dir = std::env::temp_dir().join(format!("netswap-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: netswap\n    static_configs:\n      - targets: ['{m}']\n"
        ),
    )
    .unwrap();
    let mut prom = std::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        // Port 0, and the port read from its log ('msg="Listening on"
        // address=127.0.0.1:PORT'): a port picked here and bound later by Prometheus
        // could be taken in between.
        .arg("--web.listen-address=127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("prometheus (Debian's prometheus package; the test command installs it)");
    let log = std::io::BufReader::new(prom.stderr.take().unwrap());
    // Stopped however the test ends.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let prom = Stop(prom);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut tx = Some(tx);
        // Read to the end (Prometheus must not block on a full pipe).
        for line in log.lines().map_while(Result::ok) {
            if line.contains("msg=\"Listening on\"")
                && let Some(a) = line.split("address=").nth(1)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(a.trim().to_string());
            }
        }
    });
    let web = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("Prometheus says where it listens");
    let query = format!(
        "http://{web}/api/v1/query?query=netswap_requests_total%7Bop%3D%22CREATE%22%2Cstatus%3D%22OK%22%7D"
    );
    let start = Instant::now();
    let found = loop {
        if let Ok(r) = ureq::get(&query).call()
            && let Ok(body) = r.into_body().read_to_string()
            && let Ok(v) = serde_json_value(&body)
            && let Some(n) = v
        {
            break n;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "Prometheus never had the series"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    drop(prom);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        found, 3.0,
        "Prometheus's value of netswap_requests_total{{op=CREATE,status=OK}}"
    );
    srv.stop().unwrap();
}

/// The value of the first sample in a Prometheus query answer, when there is one.
fn serde_json_value(body: &str) -> Result<Option<f64>, serde_json::Error> {
    let v: serde_json::Value = serde_json::from_str(body)?;
    Ok(v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_grafana_dashboard_uses_is_served() {
    // By the embedded store, or (the `netswap_redis_…` panels) by a gateway.
    let mut bodies = Vec::new();
    for backend in [Backend::Memory, Backend::Cluster] {
        let (srv, m) = metrics_server(backend, |_| {});
        let mut c = Raw::connect(srv.addr(), 2).await;
        c.create(Access::empty(), &b"x"[..]).await;
        bodies.push(
            ureq::get(format!("http://{m}/metrics"))
                .call()
                .unwrap()
                .into_body()
                .read_to_string()
                .unwrap(),
        );
        srv.stop().unwrap();
    }
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/grafana/netswap.json"
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut names = Vec::new();
    for p in v["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("netswap_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                names.push(name);
            }
        }
    }
    assert!(names.len() > 10);
    for n in names {
        let base = n.trim_end_matches("_bucket");
        let served = |body: &String| {
            body.contains(&format!("# TYPE {base} "))
                || body.contains(&format!("{n}{{"))
                || body.contains(&format!("{n} "))
        };
        let by = if n.starts_with("netswap_redis_") {
            &bodies[1..]
        } else {
            &bodies[..1]
        };
        assert!(by.iter().any(served), "{n} is not in /metrics");
    }
}
