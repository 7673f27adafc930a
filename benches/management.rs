//! Management API benchmark: a listing of 100,000 dead letters, page 1 against page 1,000.
//!
//! `cargo bench --bench management [-- --dead-letters N --page-size S --runs R]`
//!
//! A gateway (delivery off, admin token set) runs in this process on 127.0.0.1 with a fresh
//! data directory. The spool is filled through the `Spool` trait: appends of 1,000 events
//! (5,000 distinct users), each leased and settled as dead, so every dead letter went the
//! way production ones do. Then `GET /api/events/default/dead-letters` is timed over HTTP,
//! each figure the median of `--runs` requests after a warm-up:
//! - page 1, and page 1,000 reached through the `next` links (keyset: the way clients page);
//! - page 1,000 and the middle page asked for by number (`?page=N`: an index offset, read
//!   from the nearer end, so the middle page is the slowest);
//! - the same through a filter (`q`), which has no index and scans.
//!
//! Every answer includes `count`, which counts the matching index entries; its cost is in
//! every figure alike.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use refiner_gateway::config::{DeliverySettings, Secret, Settings, SourceSettings};
use refiner_gateway::segment::{Event, EventType, UserKey};
use refiner_gateway::spool::{AppendRequest, DeadLetterRequest, Settlement, Spool};
use refiner_gateway::startup::Application;

const ADMIN: &str = "bench-admin-token";

struct Options {
    dead_letters: usize,
    page_size: usize,
    runs: usize,
}

fn options() -> Options {
    let mut options = Options {
        dead_letters: 100_000,
        page_size: 100,
        runs: 21,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        match (args[i].as_str(), value) {
            ("--dead-letters", Some(v)) => options.dead_letters = v,
            ("--page-size", Some(v)) => options.page_size = v,
            ("--runs", Some(v)) => options.runs = v.max(1),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    options
}

fn event(n: usize) -> Event {
    let user = format!("user-{}", n % 5000);
    let payload = format!(
        r#"{{"type":"track","userId":"{user}","event":"Order {}","messageId":"dl-{n}","properties":{{"revenue":42.5}}}}"#,
        n % 17
    );
    Event {
        kind: EventType::Track,
        message_id: format!("dl-{n}"),
        user_key: UserKey::user_id(&user),
        payload: payload.into_bytes(),
    }
}

async fn fill(spool: &Arc<dyn Spool>, total: usize) {
    let mut n = 0;
    while n < total {
        let size = (total - n).min(1000);
        let events: Vec<Event> = (n..n + size).map(event).collect();
        spool
            .append(AppendRequest {
                source: "default".into(),
                received_at_ms: chrono::Utc::now().timestamp_millis(),
                events,
            })
            .await
            .expect("append");
        let leased = spool.lease(size, 60_000).await.expect("lease");
        assert_eq!(leased.len(), size, "every appended event is leased");
        spool
            .settle(Settlement {
                dead: leased
                    .iter()
                    .map(|e| DeadLetterRequest {
                        seq: e.seq,
                        status: Some(400),
                        error: "{\"error\":\"refused\"}".into(),
                        attempted: true,
                    })
                    .collect(),
                ..Settlement::default()
            })
            .await
            .expect("settle");
        n += size;
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// One request: its time and its JSON body.
    async fn time(&self, url: &str) -> (Duration, serde_json::Value) {
        let started = Instant::now();
        let response = self
            .http
            .get(url)
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "{url}");
        let body: serde_json::Value = response.json().await.expect("json");
        (started.elapsed(), body)
    }

    /// The median time of `runs` requests (after one warm-up), and the last body.
    async fn median(&self, url: &str, runs: usize) -> (Duration, serde_json::Value) {
        let (_, mut body) = self.time(url).await;
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let (elapsed, b) = self.time(url).await;
            times.push(elapsed);
            body = b;
        }
        times.sort();
        (times[times.len() / 2], body)
    }

    /// Follows `next` from `first` to page `page`; the URL of that page.
    async fn url_of_page(&self, first: &str, page: usize) -> String {
        let mut url = first.to_string();
        for _ in 1..page {
            let (_, body) = self.time(&url).await;
            url = body["next"].as_str().expect("a next page").to_string();
        }
        url
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let options = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = Settings {
            listen: "127.0.0.1:0".into(),
            data_dir: dir.path().to_path_buf(),
            admin_token: Some(Secret::new(ADMIN)),
            delivery: DeliverySettings {
                enabled: false,
                ..DeliverySettings::default()
            },
            sources: vec![SourceSettings {
                slug: "default".into(),
                write_keys: vec![Secret::new("bench-write-key")],
                webhook_secret: None,
                refiner_api_key: Some(Secret::new("k")),
                webhook_format: Default::default(),
            }],
            ..Settings::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let app = Application::build_with_listener(&settings, listener)
            .await
            .expect("app");
        let port = app.port();
        let spool = app.spool();
        let handle = app.handle();
        let server = tokio::spawn(app.run_until_stopped());

        let started = Instant::now();
        fill(&spool, options.dead_letters).await;
        println!(
            "management benchmark: {} dead letters (filled in {:.1} s), page size {}, median of {} requests, {} cores",
            options.dead_letters,
            started.elapsed().as_secs_f64(),
            options.page_size,
            options.runs,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let client = Client {
            http: reqwest::Client::new(),
            base: format!("http://127.0.0.1:{port}/api/events/default/dead-letters"),
        };
        let size = options.page_size;
        let pages = options.dead_letters.div_ceil(size);
        let deep = pages.min(1000);
        let middle = (pages / 2).max(1);
        let first = format!("{}?page_size={size}", client.base);

        let (page_1, body) = client.median(&first, options.runs).await;
        assert_eq!(body["count"], serde_json::json!(options.dead_letters));
        let walk_started = Instant::now();
        let deep_link = client.url_of_page(&first, deep).await;
        let walk = walk_started.elapsed();
        let (deep_by_link, body) = client.median(&deep_link, options.runs).await;
        assert_eq!(body["results"].as_array().map(Vec::len), Some(size.min(options.dead_letters - (deep - 1) * size)));
        let (deep_by_number, _) = client
            .median(&format!("{first}&page={deep}"), options.runs)
            .await;
        let (middle_by_number, _) = client
            .median(&format!("{first}&page={middle}"), options.runs)
            .await;
        println!("GET /api/events/default/dead-letters (o=-created_at)");
        println!("  page 1                         {:>10}", ms(page_1));
        println!(
            "  page {deep} via next links         {:>10}   (walk of {} pages: {:.2} ms per page)",
            ms(deep_by_link),
            deep - 1,
            walk.as_secs_f64() * 1000.0 / (deep.max(2) - 1) as f64
        );
        println!("  page {deep} by number (?page=)    {:>10}", ms(deep_by_number));
        println!("  page {middle} by number (middle)    {:>10}", ms(middle_by_number));
        println!(
            "  ratio page {deep} / page 1: {:.2} (next links), {:.2} (by number)",
            deep_by_link.as_secs_f64() / page_1.as_secs_f64(),
            deep_by_number.as_secs_f64() / page_1.as_secs_f64()
        );

        let by_user = format!("{}?page_size={size}&o=userId", client.base);
        let (user_1, _) = client.median(&by_user, options.runs).await;
        let user_deep_link = client.url_of_page(&by_user, deep).await;
        let (user_deep, _) = client.median(&user_deep_link, options.runs).await;
        println!("o=userId: page 1 {}, page {deep} via next links {}", ms(user_1), ms(user_deep));

        let filtered = format!("{}?page_size={size}&q=order%2016", client.base);
        let (filtered_1, body) = client.median(&filtered, options.runs.min(5)).await;
        let matching = body["count"].as_u64().unwrap_or(0) as usize;
        let filtered_pages = matching.div_ceil(size).max(1);
        let filtered_deep = client.url_of_page(&filtered, filtered_pages).await;
        let (filtered_last, _) = client.median(&filtered_deep, options.runs.min(5)).await;
        println!(
            "q=order 16 ({matching} match, no index: a scan): page 1 {}, page {filtered_pages} via next links {}",
            ms(filtered_1),
            ms(filtered_last)
        );

        handle.stop(true).await;
        let _ = server.await;
    });
}
