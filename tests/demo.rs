//! The README's first command from a user's side: `outrigger demo` starts,
//! and every command its banner prints works against it (real curl).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use support::*;

#[test]
fn every_command_the_demo_prints_works() {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("curl is needed (CI installs it)");
    }
    let mut demo = Command::new(bin())
        .args(["demo", "--threads", "1", "--log-level", "warn"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(&mut demo);
    let stdout = guard.0.stdout.take().unwrap();
    let mut commands = Vec::new();
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(cmd) = line.strip_prefix("  curl").map(|c| format!("curl{c}")) {
            commands.push(cmd);
        } else if let Some(cmd) = line.strip_prefix("  for ") {
            commands.push(format!("for {cmd}"));
        } else if let Some(cmd) = line.strip_prefix("  sed ") {
            commands.push(format!("sed {cmd}"));
        }
        if line.starts_with("Stop with") {
            break;
        }
    }
    assert!(commands.len() >= 12, "{commands:?}");
    // Keep reading (the logs), as a terminal would.
    std::thread::spawn(move || for _ in lines {});
    // The banner is printed before the proxy binds: wait for readiness.
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while http_get_raw_opt("127.0.0.1:15020".parse().unwrap(), "/ready") != Some(200) {
        assert!(std::time::Instant::now() < deadline, "demo never ready");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The mesh half is ready once the web sidecar reaches reviews.
    let reviews = "curl -s -H 'host: reviews' http://127.0.0.1:16001/";
    let sh = |cmd: &str| {
        let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    while !sh(reviews).starts_with("reviews-v1") {
        assert!(
            std::time::Instant::now() < deadline,
            "demo mesh never ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for cmd in &commands {
        let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{cmd}: {out:?}");
        if cmd.starts_with("sed ") {
            // The live edit: wait until the route follows it.
            let deadline = std::time::Instant::now() + READY_TIMEOUT;
            while !sh(reviews).starts_with("reviews-v2") {
                assert!(std::time::Instant::now() < deadline, "the edit never took");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            continue;
        }
        assert!(!text.trim().is_empty(), "{cmd} printed nothing");
        if cmd == reviews {
            assert!(text.starts_with("reviews-v1"), "{text}");
        }
        if cmd.contains("host: reviews") && cmd.starts_with("for ") {
            assert_eq!(text.matches("reviews-v2").count(), 4, "{text}");
        }
        if cmd.contains("/v1/nodes") {
            let nodes: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(nodes.as_array().map(|a| a.len()), Some(3), "{text}");
        }
        if cmd.contains("flaky.demo") {
            assert!(
                !text.contains("503"),
                "retries did not hide the flaky app: {text}"
            );
        }
        if cmd.contains("slow.demo") {
            assert!(text.contains("504") && text.contains("timeout"), "{text}");
        }
        if cmd.contains("fault-abort: 418") {
            assert!(text.starts_with("HTTP/1.1 418"), "{text}");
        }
        if cmd.contains("/public/hello") {
            assert!(
                text.contains(
                    "x-outrigger-peer-identity: spiffe://outrigger.demo/ns/default/sa/demo"
                ),
                "the app did not see the caller's identity: {text}"
            );
        }
        if cmd.contains("/private") {
            assert!(
                text.contains("403") && text.contains("unauthorized"),
                "{text}"
            );
        }
        if cmd.contains("15006/ ||") {
            assert!(
                text.contains("refused"),
                "plaintext reached the mTLS listener: {text}"
            );
        }
        if cmd.contains("nowhere") {
            assert!(text.contains("404") && text.contains("no-route"), "{text}");
        }
    }
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get_raw_opt(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    std::net::TcpStream::connect(addr).ok()?;
    Some(http_get_raw(addr, path).0)
}
