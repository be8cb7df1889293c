//! The deploy kit: every Kubernetes manifest validates offline against the Kubernetes schemas (PyPI's
//! kubernetes-validate, installed by the test command), and the manifests, the container file and the
//! configuration they ship agree with the binary: ports, probe paths, mounted paths, grace periods, the
//! reference Redis; the HAProxy example passes `haproxy -c` and sends what imapgate requires.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use imapgate::config::Config;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// kubernetes-validate from PATH or from the tools venv that scripts/ensure-dovecot.sh makes.
fn validator() -> PathBuf {
    let venv = root().join("target/tools/k8s/bin/kubernetes-validate");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("kubernetes-validate")
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let dir = root().join("deploy/kubernetes");
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 7, "{manifests:?}");
    let out = Command::new(validator())
        .arg("--strict")
        .args(&manifests)
        .output()
        .expect("kubernetes-validate (PyPI; scripts/test.sh installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The ServiceMonitor is the Prometheus operator's own kind: no Kubernetes schema, reported as such.
    let failures: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("INFO"))
        .filter(|l| !(l.contains("servicemonitor.yaml") && l.contains("Couldn't find schema")))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(failures.is_empty(), "{text}");
    assert_eq!(text.matches(" passed for resource ").count(), 11, "{text}");
}

/// The `proxy.toml` inside the ConfigMap, dedented.
fn configmap_proxy_toml() -> String {
    let manifest = read("deploy/kubernetes/configmap.yaml");
    let start = manifest.find("proxy.toml: |\n").unwrap() + "proxy.toml: |\n".len();
    manifest[start..].lines().map(|l| l.strip_prefix("    ").unwrap_or(l)).collect::<Vec<_>>().join("\n")
}

#[test]
fn manifests_container_and_config_agree_with_the_binary() {
    let config = Config::from_toml(&configmap_proxy_toml(), None).expect("the ConfigMap's proxy.toml validates");
    let deployment = read("deploy/kubernetes/deployment.yaml");
    let container = read("deploy/container/Containerfile");
    let imaps = config.server.listen[0].port();
    let admin = config.admin.listen.port();
    assert_eq!((imaps, admin), (993, 9100));
    assert!(
        deployment.contains(&format!("containerPort: {imaps}"))
            && deployment.contains(&format!("containerPort: {admin}"))
    );
    assert!(container.contains(&format!("EXPOSE {imaps} {admin}")));
    // Probes on the admin server's own paths.
    let admin_source = read("src/admin/mod.rs");
    for path in ["/readyz", "/healthz"] {
        assert!(
            deployment.contains(&format!("path: {path}")) && admin_source.contains(&format!("\"{path}\"")),
            "{path}"
        );
    }
    // The Secret's files are where the configuration reads them.
    for (file, configured) in [("tls.crt", &config.tls.cert), ("tls.key", &config.tls.key)] {
        assert_eq!(configured, &PathBuf::from(format!("/etc/imapgate/tls/{file}")));
        assert!(read("deploy/kubernetes/secret.yaml").contains(&format!("{file}: |")));
    }
    assert!(
        deployment.contains("mountPath: /etc/imapgate/tls")
            && deployment.contains("mountPath: /etc/imapgate/proxy.toml")
    );
    // The preStop leaves slowly (`imapgate leave` waits for the drain spread and the grace), and the
    // termination grace is above what it waits.
    let number_after = |text: &str, key: &str| -> u64 {
        let rest = &text[text.find(key).unwrap_or_else(|| panic!("{key}")) + key.len()..];
        rest.trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    let termination = number_after(&deployment, "terminationGracePeriodSeconds:");
    assert!(
        deployment.contains(r#"command: ["/usr/local/bin/imapgate", "leave", "--config", "/etc/imapgate/proxy.toml"]"#),
        "the preStop hook leaves slowly"
    );
    assert!(config.server.drain_spread.as_secs() >= 60, "a rollout's spread is minutes");
    let leave = config.server.drain_spread.as_secs() + config.server.shutdown_grace.as_secs() + 2;
    assert!(termination > leave + 1, "terminationGracePeriodSeconds {termination} <= {leave} + 1");
    // The Services select the pods the Deployment labels, and keep client addresses.
    assert!(read("deploy/kubernetes/service.yaml").contains("externalTrafficPolicy: Local"));
    assert!(config.audit.is_some_and(|a| a.target == imapgate::config::AuditTarget::Stdout));
    // The replicas share their defence through the reference Redis, at the name and port its Service has.
    let redis = read("deploy/kubernetes/redis.yaml");
    let state = config.state.expect("[state] in the ConfigMap");
    assert_eq!(state.redis, "redis://imapgate-redis:6379/0");
    assert!(redis.contains("name: imapgate-redis") && redis.contains("port: 6379"));
    assert!(deployment.contains("replicas: 2"));
}

#[test]
fn the_haproxy_example_is_valid_and_sends_what_imapgate_requires() {
    let path = root().join("deploy/haproxy/haproxy.cfg");
    let out = Command::new("/usr/sbin/haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .output()
        .expect("haproxy (Debian's package; scripts/test.sh installs it)");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let text = read("deploy/haproxy/haproxy.cfg");
    let servers: Vec<&str> = text.lines().filter(|l| l.trim_start().starts_with("server ")).collect();
    assert!(servers.len() >= 2, "{servers:?}");
    for server in servers {
        assert!(server.contains("send-proxy-v2") && server.contains("check-send-proxy"), "{server}");
    }
    // The imapgate side it asks for validates.
    let snippet: String = text
        .lines()
        .skip_while(|l| !l.contains("[server]"))
        .take_while(|l| l.starts_with("#   "))
        .map(|l| format!("{}\n", l.trim_start_matches("#   ")))
        .collect();
    assert!(snippet.contains("proxy_protocol = \"required\""), "{snippet}");
    let proxy = read("proxy.toml").replacen("[server]\n", &snippet, 1);
    let proxy = proxy.replace("proxy_protocol = \"off\"", "").replace("proxy_protocol_from = []", "");
    Config::from_toml(&proxy, None).expect("proxy.toml with the example's [server] keys validates");
}
