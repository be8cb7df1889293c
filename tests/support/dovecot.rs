//! A real Dovecot, configured in a private directory (never the system's configuration), listening on
//! loopback ports chosen at run time: IMAP with STARTTLS for the proxy, IMAPS for direct comparisons.
//! The process ends when the test process does: a small shell keeps it and kills it when its stdin, held
//! by this process, closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use super::pki::Pki;
use super::{free_port, wait_until};

/// Demo and test accounts: (user, password). Passwords exercise quoting: spaces, quotes, backslashes,
/// braces and non-ASCII text (which must travel as a literal).
pub const USERS: &[(&str, &str)] = &[
    ("alice@example.org", "alice-pw"),
    ("bob@example.com", "bob-pw"),
    ("carol@example.org", "sp ace\"quo\\te{5}"),
    ("jürgen@example.org", "pässwörd"),
    ("ceo@example.org", "ceo-pw"),
    ("big@example.org", "big-pw"),
    ("pipeline@example.org", "pipe-pw"),
    ("fetcher@example.org", "fetch-pw"),
];

/// Accounts with a small quota (Dovecot's quota plugin, maildir backend): (user, password, quota rule).
pub const QUOTA_USERS: &[(&str, &str, &str)] = &[("quota@example.org", "quota-pw", "*:storage=48K")];

pub fn password(user: &str) -> &'static str {
    USERS.iter().find(|(u, _)| *u == user).map(|(_, p)| *p).expect("known user")
}

pub struct Dovecot {
    pub name: String,
    pub dir: PathBuf,
    /// Plain IMAP with STARTTLS.
    pub imap_port: u16,
    /// Implicit TLS.
    pub imaps_port: u16,
    /// Plain IMAP with STARTTLS behind a PROXY protocol header (`haproxy = yes`): refuses connections
    /// without one.
    pub haproxy_port: u16,
    pub log_path: PathBuf,
    mail_owner: Option<(u32, u32)>,
    keeper: Child,
    keeper_stdin: Option<ChildStdin>,
}

fn dovecot_binary() -> PathBuf {
    for candidate in ["/usr/sbin/dovecot", "/usr/local/sbin/dovecot"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!("dovecot not found: install Debian's dovecot-imapd (scripts/test.sh does)");
}

/// (uid, gid, name) of a user from /etc/passwd.
fn passwd_entry(matches: impl Fn(&str, u32) -> bool) -> Option<(u32, u32, String)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        let (uid, gid) = (f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
        matches(f[0], uid).then(|| (uid, gid, f[0].to_owned()))
    })
}

impl Dovecot {
    /// Starts an instance named `name` (its greeting says so) with the certificate from `pki` and `extra`
    /// accounts on top of [`USERS`].
    pub fn start(name: &str, pki: &Pki, extra_users: &[(String, String)]) -> Dovecot {
        Self::start_with(name, pki, extra_users, None, 1)
    }

    /// Starts an instance for thousands of sessions at once (the benchmark's 5,000 idle sessions): each
    /// `imap` process serves up to ten connections, so that the process limit is not reached.
    pub fn start_for_crowds(name: &str, pki: &Pki) -> Dovecot {
        Self::start_with(name, pki, &[], None, 10)
    }

    /// Starts an instance that also takes OAuth 2.0 bearer tokens (XOAUTH2 and OAUTHBEARER, Dovecot's
    /// `oauth2` passdb) and validates them at `introspection_url` (RFC 7662, POST), as an organisation's
    /// identity provider answers.
    pub fn start_with_oauth(name: &str, pki: &Pki, introspection_url: &str) -> Dovecot {
        Self::start_with(name, pki, &[], Some(introspection_url), 1)
    }

    fn start_with(
        name: &str,
        pki: &Pki,
        extra_users: &[(String, String)],
        oauth: Option<&str>,
        imap_clients: u32,
    ) -> Dovecot {
        let dir = tempfile::Builder::new().prefix(&format!("imapgate-dovecot-{name}-")).tempdir().unwrap().keep();
        for sub in ["run", "home", "state"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // Dovecot needs the whole path to its base_dir reachable by its unprivileged users.
        set_mode(&dir, 0o755);
        let euid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
        let (mail_uid, mail_gid, internal, login, mail_owner) = if euid == 0 {
            let (uid, gid, _) = passwd_entry(|n, _| n == "mail").expect("a 'mail' user (Debian has uid 8)");
            (uid, gid, "dovecot".to_owned(), "dovenull".to_owned(), Some((uid, gid)))
        } else {
            let (uid, gid, user) = passwd_entry(|_, uid| uid == euid).expect("current user in /etc/passwd");
            (uid, gid, user.clone(), user, None)
        };
        let mut users = String::new();
        for (user, pass) in USERS.iter().map(|(u, p)| (u.to_string(), p.to_string())).chain(extra_users.iter().cloned())
        {
            users.push_str(&format!("{user}:{{PLAIN}}{pass}::::::\n"));
        }
        for (user, pass, rule) in QUOTA_USERS {
            users.push_str(&format!("{user}:{{PLAIN}}{pass}::::::userdb_quota_rule={rule}\n"));
        }
        std::fs::write(dir.join("users"), users).unwrap();
        // Several clients per imap process need long-lived processes (Dovecot's default serves one, then exits).
        let service_count = if imap_clients > 1 { 0 } else { 1 };
        let imap_port = free_port();
        let imaps_port = free_port();
        let haproxy_port = free_port();
        let log_path = dir.join("dovecot.log");
        let d = dir.display();
        let (mechanisms, oauth_passdb) = match oauth {
            None => ("plain login", String::new()),
            Some(url) => {
                std::fs::write(
                    dir.join("dovecot-oauth2.conf.ext"),
                    format!(
                        "introspection_mode = post\nintrospection_url = {url}\nusername_attribute = username\n\
                         active_attribute = active\nactive_value = true\ntimeout_msecs = 5000\n"
                    ),
                )
                .unwrap();
                let passdb = format!(
                    "passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {d}/dovecot-oauth2.conf.ext\n}}\n"
                );
                ("plain login xoauth2 oauthbearer", passdb)
            }
        };
        let conf = format!(
            r#"# Private test instance: nothing here touches the system's Dovecot.
instance_name = imapgate-{name}-{imap_port}
base_dir = {d}/run
state_dir = {d}/state
protocols = imap
listen = 127.0.0.1
log_path = {log}
info_log_path = {log}
login_greeting = Dovecot {name} ready.
login_log_format_elements = user=<%u> method=%m rip=%r rport=%{{rport}} lip=%l mpid=%e %c session=<%{{session}}>
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = {mechanisms}
auth_failure_delay = 0
# Allow UTF-8 usernames (the default allows only ASCII letters, digits and .-_@).
auth_username_chars =
login_trusted_networks = 127.0.0.0/8 ::1
haproxy_trusted_networks = 127.0.0.0/8 ::1
first_valid_uid = 1
default_internal_user = {internal}
default_login_user = {login}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 10000
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {d}/users
}}
{oauth_passdb}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={d}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = {imaps_port}
  }}
  inet_listener imap_haproxy {{
    port = {haproxy_port}
    haproxy = yes
  }}
  process_min_avail = 2
  service_count = 0
  client_limit = 2000
}}
service imap {{
  process_limit = 2000
  client_limit = {imap_clients}
  service_count = {service_count}
}}
# Quotas: only the accounts with a quota_rule (QUOTA_USERS) have one.
mail_plugins = $mail_plugins quota
plugin {{
  quota = maildir:User quota
}}
# COMPRESS=DEFLATE after login, so that tests of the post-login guard can fail: a backend without it
# would refuse a smuggled COMPRESS by itself.
protocol imap {{
  mail_plugins = $mail_plugins zlib imap_zlib
}}
# Process titles name the user, so that a test can kill the imap process of one session.
verbose_proctitle = yes
default_process_limit = 2000
default_client_limit = 4000
# Dovecot's own per-IP auth penalty is switched off: every test connects from 127.0.0.1, and imapgate's
# defence (not Dovecot's) is what the tests measure. Without access to this socket the penalty is off.
service anvil {{
  chroot =
  client_limit = 5000
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"#,
            log = log_path.display(),
            cert = pki.cert.display(),
            key = pki.key.display(),
        );
        std::fs::write(dir.join("dovecot.conf"), conf).unwrap();
        let mut keeper = Command::new("sh")
            .arg("-c")
            .arg(r#"trap '' INT TERM HUP; "$1" -F -c "$2" </dev/null >>"$3" 2>&1 & pid=$!; read _ignored; kill "$pid" 2>/dev/null; wait "$pid"; rm -rf "$4""#)
            .arg("sh")
            .arg(dovecot_binary())
            .arg(dir.join("dovecot.conf"))
            .arg(dir.join("stdout.log"))
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dovecot");
        let keeper_stdin = keeper.stdin.take();
        let dovecot = Dovecot {
            name: name.into(),
            dir,
            imap_port,
            imaps_port,
            haproxy_port,
            log_path,
            mail_owner,
            keeper,
            keeper_stdin,
        };
        let ready = wait_until(Duration::from_secs(15), || {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", imap_port)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            let mut line = String::new();
            BufReader::new(&mut stream).read_line(&mut line).ok()?;
            line.starts_with("* OK").then_some(())
        });
        if ready.is_none() {
            let mut out = String::new();
            let _ = std::fs::File::open(dovecot.dir.join("stdout.log")).and_then(|mut f| f.read_to_string(&mut out));
            panic!("dovecot {name} did not start: {out}\n{}", dovecot.log());
        }
        dovecot
    }

    /// Kills (SIGKILL) the imap processes serving `user`, as a crash would; returns how many.
    pub fn kill_sessions_of(&self, user: &str) -> usize {
        let needle = format!("/imap [{user} ");
        let mut killed = 0;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
                killed += 1;
            }
        }
        killed
    }

    /// Puts a message into `user`'s INBOX (seen by Dovecot at the next SELECT).
    pub fn deliver(&self, user: &str, file_name: &str, message: &[u8]) {
        let home = self.dir.join("home").join(user);
        let maildir = home.join("Maildir");
        for sub in ["new", "cur", "tmp"] {
            std::fs::create_dir_all(maildir.join(sub)).unwrap();
        }
        let path = maildir.join("new").join(file_name);
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(message).unwrap();
        if let Some((uid, gid)) = self.mail_owner {
            for p in
                [home.clone(), maildir.clone(), maildir.join("new"), maildir.join("cur"), maildir.join("tmp"), path]
            {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits up to 5 s for a log line containing every one of `needles`; returns it.
    pub fn wait_for_log_line(&self, needles: &[&str]) -> Option<String> {
        wait_until(Duration::from_secs(5), || {
            self.log().lines().find(|l| needles.iter().all(|n| l.contains(n))).map(str::to_owned)
        })
    }

    /// Lines of the log that record a successful login of `user`.
    pub fn logins_of(&self, user: &str) -> usize {
        let needle = format!("Login: user=<{user}>");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // Closing stdin makes the keeper kill Dovecot and remove the directory.
        drop(self.keeper_stdin.take());
        let _ = self.keeper.wait();
    }
}
