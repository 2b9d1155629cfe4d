//! The fleet page (`GET /`, `http/ui.rs`) in a real browser: headless
//! Chromium driven through chromedriver (WebDriver), against an aggregator
//! that real test nodes connect and send to.
//!
//! First, over plain HTTP: the page's files answer without a token, with
//! their content types and `no-cache`, and the API does not. Then, in one
//! browser session: without a token the page asks for one and shows no
//! node; a wrong token is refused and shows nothing; the right one lists
//! the nodes; a node that connects while the page is open appears at the
//! next refresh without a reload, and one that leaves turns `disconnected`;
//! headers sort, the state filter filters; a click opens a node's detail
//! with its stream names, shown as text (a stream named like markup stays
//! text); "forget token" clears the page.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/test.sh`
//! installs them); without them it fails saying so. `FOGLINE_CHROMIUM` and
//! `FOGLINE_CHROMEDRIVER` name other binaries; `FOGLINE_UI_SCREENSHOT=<file>`
//! keeps a copy of the screenshot it takes.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::http_api::OUTBOX;
use fantoccini::{Client, ClientBuilder, Locator};
use fogline_aggregator::config::CloudConfig;
use fogline_aggregator::http::auth::digest;
use fogline_aggregator::RunningAggregator;
use fogline_protocol::Record;
use fogline_testkit::node::{node_tls, TestNode};
use fogline_transport::client::ClientTransport;
use fogline_transport::Transport;
use serde::Deserialize;
use serde_json::json;

const TOKEN: &str = "fgl_fleet_page_test_read";
/// The whole browser scenario ends within this, or the test fails.
const BUDGET: Duration = Duration::from_secs(50);
/// One step (a refresh is every second): how long to wait for the page.
const STEP: Duration = Duration::from_secs(8);
/// A stream name that is also markup: it must show as text.
const MARKUP_STREAM: &str = "site/<b>bold</b>/temp";

const INSTALL: &str = "apt-get install chromium chromium-driver \
     (Debian; scripts/test.sh installs them when missing), \
     or point FOGLINE_CHROMIUM / FOGLINE_CHROMEDRIVER at the binaries";

/// `env` if set, else the first of `names` on `PATH` or in `/usr/bin`,
/// `/usr/lib/chromium`.
fn find_binary(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/bin", "/usr/lib/chromium"].map(PathBuf::from));
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// chromedriver on a free port, in a process group of its own; dropping it
/// kills the group (chromedriver and the browser it started), also when
/// the test fails.
struct Chromedriver {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Chromedriver {
    fn start(bin: &Path, dir: &Path) -> Self {
        let port = fogline_testkit::free_tcp_port().unwrap();
        let log = dir.join("chromedriver.log");
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL}", bin.display()));
        let mut driver = Self { child, port, log };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = driver.child.try_wait() {
                panic!(
                    "chromedriver exited ({status}) before listening on {port}: {}",
                    driver.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {port} within 10 s: {}",
                driver.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // Negative pid: the whole group, the browser included.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(dir: &Path) -> CloudConfig {
    let certs = dir.join("certs");
    fogline_testkit::certs::dev_bundle(&certs, &["gw-1", "gw-2", "gw-3"]).unwrap();
    CloudConfig::parse(&format!(
        "[quic]\nlisten = \"127.0.0.1:0\"\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/server.pem\"\nkey = \"{c}/server.key\"\n\
         [store]\npath = \"{d}/cloud.db\"\n[tcp]\nenabled = false\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [[http.tokens]]\nname = \"page\"\nscope = \"read\"\nsha256 = \"{t}\"\n",
        c = certs.display(),
        d = dir.display(),
        t = digest(TOKEN)
    ))
    .unwrap()
}

/// A node connected over QUIC that has sent `count` records spread over
/// `streams`; its connection stays up while this lives.
struct Node {
    _transport: ClientTransport,
    _link: TestNode,
}

async fn node(agg: &RunningAggregator, dir: &Path, id: &str, streams: &[&str], count: u64) -> Node {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let records: Vec<Record> = (1..=count)
        .map(|seq| Record {
            seq,
            stream: streams[(seq as usize - 1) % streams.len()].to_string(),
            timestamp_ms: now - (count - seq) * 1000,
            payload: format!("{{\"n\":{seq}}}").into_bytes(),
        })
        .collect();
    let transport = ClientTransport::new(node_tls(&dir.join("certs"), id)).unwrap();
    let mut link = TestNode::connect(&transport, Transport::Quic, agg.quic_addr, OUTBOX)
        .await
        .unwrap();
    link.send(&records).await.unwrap();
    assert_eq!(link.acked_through(count).await.unwrap(), count);
    Node {
        _transport: transport,
        _link: link,
    }
}

/// What the page shows, read in one script.
#[derive(Debug, Deserialize)]
struct Snapshot {
    state: String,
    refreshes: u64,
    status: String,
    login: bool,
    refused: bool,
    fleet: bool,
    rows: Vec<Row>,
    detail: Option<String>,
    streams: Vec<String>,
    markup_in_streams: u64,
    marker: Option<u64>,
    has_token: bool,
}

#[derive(Debug, Deserialize)]
struct Row {
    node: String,
    cells: Vec<String>,
}

impl Snapshot {
    fn nodes(&self) -> Vec<&str> {
        self.rows.iter().map(|r| r.node.as_str()).collect()
    }

    fn cell(&self, node: &str, column: usize) -> Option<&str> {
        self.rows
            .iter()
            .find(|r| r.node == node)
            .and_then(|r| r.cells.get(column))
            .map(String::as_str)
    }
}

const SNAPSHOT_JS: &str = r##"
const q = (s) => document.querySelector(s);
const shown = (s) => { const e = q(s); return !!e && e.getClientRects().length > 0; };
return {
  state: document.body.dataset.state || "",
  refreshes: Number(document.body.dataset.refreshes || 0),
  status: q("#status").textContent,
  login: shown("#token-form"),
  refused: shown("#refused"),
  fleet: shown("#fleet"),
  rows: [...document.querySelectorAll("#nodes tbody tr")].map((r) => ({
    node: r.dataset.node,
    cells: [...r.cells].map((c) => c.textContent),
  })),
  detail: shown("#detail") ? q("#detail-node").textContent : null,
  streams: [...document.querySelectorAll("#streams tbody tr")].map((r) => r.cells[0].textContent),
  markup_in_streams: q("#streams").querySelectorAll("tbody b, tbody img, tbody script").length,
  marker: window.__fleetMarker ?? null,
  has_token: sessionStorage.getItem("fogline.token") !== null,
};
"##;

/// Columns of the node table.
const STATE: usize = 1;
const LOSSES: usize = 6;

struct Page {
    c: Client,
}

impl Page {
    async fn snapshot(&self) -> Snapshot {
        let v = self.c.execute(SNAPSHOT_JS, vec![]).await.unwrap();
        serde_json::from_value(v).unwrap()
    }

    /// Polls the page until `ok` holds; fails with what it shows.
    async fn until(&self, what: &str, ok: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let deadline = Instant::now() + STEP;
        loop {
            let s = self.snapshot().await;
            if ok(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("the page did not show {what} within {STEP:?}; it shows {s:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks `css`, again if a refresh replaced the element meanwhile.
    async fn click(&self, css: &str) {
        let mut last = None;
        for _ in 0..5 {
            match self.c.find(Locator::Css(css)).await {
                Ok(e) => match e.click().await {
                    Ok(()) => return,
                    Err(err) => last = Some(err.to_string()),
                },
                Err(err) => last = Some(err.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot click {css}: {last:?}");
    }

    async fn enter_token(&self, token: &str) {
        let input = self.c.find(Locator::Id("token")).await.unwrap();
        input.clear().await.unwrap();
        input.send_keys(token).await.unwrap();
        self.click("#token-form button[type=submit]").await;
    }
}

async fn scenario(agg: &RunningAggregator, driver: &Chromedriver, chromium: &Path, dir: &Path) {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", format!("--user-data-dir={}", dir.join("profile").display()),
            ],
        }),
    );
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "chromedriver could not start {}: {e}\n{}",
                chromium.display(),
                driver.log_tail()
            )
        });
    let page = Page { c };
    let base = format!("http://{}", agg.http_addr);

    // Two nodes are up before the page opens.
    let gw1 = node(agg, dir, "gw-1", &["site/a/temp", "site/a/hum"], 3).await;
    let _gw2 = node(
        agg,
        dir,
        "gw-2",
        &["line/1/vibration", "line/1/temp", MARKUP_STREAM],
        6,
    )
    .await;

    // (1) No token: the prompt, no rows, no data fetched.
    page.c.goto(&format!("{base}/?refresh=1")).await.unwrap();
    let s = page
        .until("the token prompt", |s| s.state == "need-token")
        .await;
    assert!(
        s.login && !s.fleet && !s.refused && s.rows.is_empty(),
        "{s:#?}"
    );
    assert_eq!(page.c.title().await.unwrap(), "Fogline fleet");

    // A wrong token: refused, still no rows, not kept.
    page.enter_token("fgl_not_a_token_of_this_fleet").await;
    let s = page.until("the refusal", |s| s.state == "refused").await;
    assert!(
        s.refused && s.login && !s.fleet && s.rows.is_empty() && !s.has_token,
        "{s:#?}"
    );
    assert!(s.status.contains("refused"), "{s:#?}");

    // (2) The right token: both nodes, connected, nothing lost.
    page.enter_token(TOKEN).await;
    let s = page
        .until("gw-1 and gw-2", |s| s.nodes() == ["gw-1", "gw-2"])
        .await;
    assert!(
        s.fleet && !s.login && s.has_token && s.state == "ok",
        "{s:#?}"
    );
    assert_eq!(s.cell("gw-1", STATE), Some("connected"), "{s:#?}");
    assert_eq!(s.cell("gw-2", LOSSES), Some("0"), "{s:#?}");

    // (3) A third node while the page is open: shown at a refresh, no reload.
    page.c
        .execute("window.__fleetMarker = 42; return null;", vec![])
        .await
        .unwrap();
    let before = s.refreshes;
    let _gw3 = node(agg, dir, "gw-3", &["yard/gate"], 4).await;
    let s = page
        .until("gw-3 after it connected", |s| {
            s.nodes() == ["gw-1", "gw-2", "gw-3"]
        })
        .await;
    assert_eq!(s.marker, Some(42), "the page was reloaded: {s:#?}");
    assert!(s.refreshes > before, "{s:#?}");

    // A node that leaves turns disconnected.
    drop(gw1);
    page.until("gw-1 disconnected", |s| {
        s.cell("gw-1", STATE) == Some("disconnected")
    })
    .await;

    // (4) Sorting: by node, both ways; by last seen, newest first.
    page.click("th[data-key=node] button").await;
    page.until("nodes in descending order", |s| {
        s.nodes() == ["gw-3", "gw-2", "gw-1"]
    })
    .await;
    page.click("th[data-key=last_seen] button").await;
    page.until("the newest node first", |s| {
        s.nodes().first() == Some(&"gw-3")
    })
    .await;
    page.click("th[data-key=node] button").await;
    page.until("nodes in ascending order", |s| {
        s.nodes() == ["gw-1", "gw-2", "gw-3"]
    })
    .await;
    // Filtering by state.
    let filter = page.c.find(Locator::Id("state-filter")).await.unwrap();
    filter.select_by_value("disconnected").await.unwrap();
    page.until("only the disconnected node", |s| s.nodes() == ["gw-1"])
        .await;
    filter.select_by_value("connected").await.unwrap();
    page.until("only the connected nodes", |s| {
        s.nodes() == ["gw-2", "gw-3"]
    })
    .await;
    filter.select_by_value("").await.unwrap();

    // (5) A node's detail: its streams, names as text.
    page.click("#nodes tbody tr[data-node='gw-2']").await;
    let s = page
        .until("gw-2's detail with its streams", |s| {
            s.detail.as_deref() == Some("gw-2") && s.streams.len() == 3
        })
        .await;
    let mut expected = vec!["line/1/temp", "line/1/vibration", MARKUP_STREAM];
    expected.sort();
    assert_eq!(s.streams, expected, "{s:#?}");
    assert_eq!(
        s.markup_in_streams, 0,
        "a stream name became markup: {s:#?}"
    );
    // The detail stays open, and current, across refreshes.
    let at = s.refreshes;
    let s = page
        .until("a refresh with the detail open", |s| s.refreshes > at)
        .await;
    assert_eq!(s.detail.as_deref(), Some("gw-2"), "{s:#?}");
    assert_eq!(s.streams, expected, "{s:#?}");

    let png = page.c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(dir.join("fleet.png"), &png).unwrap();
    if let Some(keep) = std::env::var_os("FOGLINE_UI_SCREENSHOT") {
        std::fs::write(&keep, &png).unwrap();
    }

    // Forgetting the token clears the page.
    page.click("#forget").await;
    let s = page
        .until("the prompt after forget", |s| s.state == "need-token")
        .await;
    assert!(
        s.rows.is_empty() && s.detail.is_none() && !s.has_token,
        "{s:#?}"
    );

    page.c.close().await.unwrap();
}

/// The page's three files answer without a token, with their types and
/// `no-cache`; the API behind them does not.
async fn served_without_a_token(base: &str) {
    for (path, kind) in [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let r = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let header = |h: &str| {
            r.headers()
                .get(h)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        assert!(header("content-type").starts_with(kind), "{path}");
        assert_eq!(header("cache-control"), "no-cache", "{path}");
        if path == "/" {
            assert!(
                header("content-security-policy").contains("default-src 'none'"),
                "{path}"
            );
        }
    }
    let r = reqwest::get(format!("{base}/api/v1/nodes")).await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_page_shows_the_fleet_to_a_token_only_and_keeps_up() {
    let chromium = find_binary("FOGLINE_CHROMIUM", &["chromium", "chromium-browser"])
        .unwrap_or_else(|| panic!("the fleet page test needs Chromium: {INSTALL}"));
    let chromedriver = find_binary("FOGLINE_CHROMEDRIVER", &["chromedriver"])
        .unwrap_or_else(|| panic!("the fleet page test needs chromedriver: {INSTALL}"));
    let dir = tempfile::tempdir().unwrap();
    let agg = fogline_aggregator::start(config(dir.path())).await.unwrap();
    served_without_a_token(&format!("http://{}", agg.http_addr)).await;
    let driver = Chromedriver::start(&chromedriver, dir.path());
    let outcome =
        tokio::time::timeout(BUDGET, scenario(&agg, &driver, &chromium, dir.path())).await;
    agg.shutdown().await;
    assert!(
        outcome.is_ok(),
        "the browser scenario took longer than {BUDGET:?}; chromedriver says:\n{}",
        driver.log_tail()
    );
}
