//! Where this machine's PostgreSQL server programs (`initdb`, `pg_ctl`) are, for a throwaway
//! cluster of our own: the demo's, and the tests' (`testing::Cluster`).
//!
//! Invariant: Debian's `/usr/bin/pg_ctl*` are wrappers; the real binaries under
//! `/usr/lib/postgresql/<version>/bin` are preferred, the newest version first.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory holding `initdb` and `pg_ctl`, from `PATH` or `/usr/lib/postgresql/*/bin`.
pub fn bin_dir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    candidates
        .into_iter()
        .filter(|d| has_tools(d))
        .max_by_key(|d| d.starts_with("/usr/lib/postgresql"))
}

/// Whether this process runs as root (PostgreSQL's programs refuse to: run them as `postgres`).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
