//! The user lookup service of the tests: `lookup_service.py`, an nginx `auth_http`-style service run with
//! Debian's python3 on a loopback port chosen at run time, answering from a JSON file the test writes.

use std::path::{Path, PathBuf};
use std::process::Child;

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
        let (answers_path, log) = (dir.join(format!("answers-{port}.json")), dir.join(format!("lookups-{port}.log")));
        std::fs::write(&answers_path, answers.to_string()).unwrap();
        std::fs::write(&log, "").unwrap();
        let child = super::python_service("lookup_service.py", port, &[("--answers", &answers_path), ("--log", &log)]);
        LookupService { port, answers: answers_path, log, child: Some(child) }
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
