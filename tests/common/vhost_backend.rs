//! The real vhost-user backend the tests and the `vhost_user_rng` example run against: rust-vmm's
//! `vhost-device-rng`, installed on first use by `cargo install --locked` into a cache directory
//! (`$VM_NOTIFY_BACKEND_CACHE`, or `vhost-backends` under cargo's target directory). No manual
//! step: a fresh machine with crates.io access installs it (about a minute here) the first time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The backend crate and the version the tests were written against.
const CRATE: &str = "vhost-device-rng";
const VERSION: &str = "0.1.0";

static INSTALL: Mutex<()> = Mutex::new(());

fn cache_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("VM_NOTIFY_BACKEND_CACHE") {
        return PathBuf::from(dir);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("vhost-backends")
}

/// The backend's binary, installed if it is not there yet.
pub fn binary() -> PathBuf {
    let root = cache_dir();
    let bin = root.join("bin").join(CRATE);
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if bin.exists() {
        return bin;
    }
    eprintln!(
        "installing {CRATE} {VERSION} into {} (first use)",
        root.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "install",
            "--locked",
            "--quiet",
            CRATE,
            "--version",
            VERSION,
            "--root",
        ])
        .arg(&root)
        .status()
        .expect("run cargo install");
    assert!(status.success(), "cargo install {CRATE} failed: {status}");
    assert!(
        bin.exists(),
        "{} missing after cargo install",
        bin.display()
    );
    bin
}

/// A running backend; killed when dropped.
pub struct Backend {
    pub child: Child,
    pub socket: PathBuf,
}

impl Backend {
    /// Starts the backend on a fresh socket in a temporary directory and waits until it listens.
    pub fn start(name: &str) -> Backend {
        let dir = std::env::temp_dir().join(format!("vm-notify-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("rng.sock");
        // The backend appends the socket's index to the path it is given.
        let socket = dir.join("rng.sock0");
        let child = Command::new(binary())
            .arg("--socket-path")
            .arg(&base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the vhost-user backend");
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the backend did not listen at {} within 30 s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Backend { child, socket }
    }

    /// Kills the backend now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.socket.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
