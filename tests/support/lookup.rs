//! The user lookup service of the tests: `lookup_service.py`, an nginx `auth_http`-style service run with
//! Debian's python3 on a loopback port chosen at run time, answering from a JSON file the test writes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct LookupService {
    pub port: u16,
    pub answers: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl LookupService {
    /// Starts the service with `answers` (user -> answer, see the script) in `dir`.
    pub fn start(dir: &Path, answers: &serde_json::Value) -> LookupService {
        let port = super::free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/lookup_service.py");
        let (answers_path, log) = (dir.join(format!("answers-{port}.json")), dir.join(format!("lookups-{port}.log")));
        std::fs::write(&answers_path, answers.to_string()).unwrap();
        std::fs::write(&log, "").unwrap();
        let child = Command::new("python3")
            .arg(&script)
            .args(["--port", &port.to_string()])
            .arg("--answers")
            .arg(&answers_path)
            .arg("--log")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 (Debian package 'python3'; scripts/test.sh installs it)");
        let mut service = LookupService { port, answers: answers_path, log, child: Some(child) };
        let up = super::wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
        assert!(up.is_some(), "lookup service did not start");
        service.child.as_mut().map(|c| c.try_wait().map(|s| assert!(s.is_none(), "lookup service exited")));
        service
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/auth", self.port)
    }

    /// Replaces the answers.
    pub fn answer(&self, answers: &serde_json::Value) {
        std::fs::write(&self.answers, answers.to_string()).unwrap();
    }

    /// The requests received so far (their headers).
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Stops the service (it is down from now on).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LookupService {
    fn drop(&mut self) {
        self.stop();
    }
}
