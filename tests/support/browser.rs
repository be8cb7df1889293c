//! A real browser for the console's test: Debian's headless Chromium driven by its ChromeDriver over the
//! W3C WebDriver protocol (JSON over HTTP on a loopback port chosen at run time), with the few commands the
//! test needs. `Browser::start` is `None` when Chromium or ChromeDriver is not installed.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    // Read the head, then exactly Content-Length bytes (the driver may keep the connection open).
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let read = async {
        loop {
            if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()));
                if let Some(length) = length {
                    if out.len() >= end + 4 + length {
                        out.truncate(end + 4 + length);
                        return;
                    }
                }
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    let (_, payload) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    serde_json::from_str(payload).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
}

impl Browser {
    /// Starts ChromeDriver and a headless Chromium session that keeps the page's console messages.
    pub async fn start() -> Option<Browser> {
        if !std::path::Path::new(CHROMIUM).exists() || !std::path::Path::new(CHROMEDRIVER).exists() {
            return None;
        }
        let port = super::free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let up = super::wait_until(Duration::from_secs(20), || std::net::TcpStream::connect(addr).ok());
        assert!(up.is_some(), "chromedriver did not start");
        let profile = super::scratch_dir("imapgate-chromium-");
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,1100", "--no-first-run", format!("--user-data-dir={}", profile.display())],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        }}});
        let mut browser = Browser { driver, addr, session: String::new() };
        let created = http(addr, "POST", "/session", Some(&capabilities)).await;
        let session = created["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {created}"));
        browser.session = session.to_owned();
        Some(browser)
    }

    async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let full = format!("/session/{}{path}", self.session);
        let answer = http(self.addr, method, &full, body.as_ref()).await;
        assert!(answer["value"]["error"].is_null(), "{method} {path}: {answer}");
        answer["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url }))).await;
    }

    /// Runs `script` (a function body; `arguments` as usual) in the page and returns its value.
    pub async fn eval(&self, script: &str) -> Value {
        self.command("POST", "/execute/sync", Some(json!({ "script": script, "args": [] }))).await
    }

    async fn element(&self, css: &str) -> String {
        let found = self.command("POST", "/element", Some(json!({ "using": "css selector", "value": css }))).await;
        found[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {found}")).to_owned()
    }

    /// Types `text` into the element `css`.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.command("POST", &format!("/element/{id}/value"), Some(json!({ "text": text }))).await;
    }

    /// Clicks the element `css` as a user would.
    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.command("POST", &format!("/element/{id}/click"), Some(json!({}))).await;
    }

    /// Polls `script` (which returns a value or null) every 100 ms for up to `limit`.
    pub async fn wait_for(&self, script: &str, limit: Duration) -> Value {
        let started = std::time::Instant::now();
        loop {
            let value = self.eval(script).await;
            if !value.is_null() && value != Value::Bool(false) {
                return value;
            }
            assert!(started.elapsed() < limit, "timed out waiting for: {script}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The page's console messages so far (level and message), drained.
    pub async fn console(&self) -> Vec<(String, String)> {
        let logs = self.command("POST", "/se/log", Some(json!({ "type": "browser" }))).await;
        logs.as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| {
                        (e["level"].as_str().unwrap_or("").to_owned(), e["message"].as_str().unwrap_or("").to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A PNG of the window.
    pub async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let png = self.command("GET", "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    pub async fn close(mut self) {
        let _ = http(self.addr, "DELETE", &format!("/session/{}", self.session), None).await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}
