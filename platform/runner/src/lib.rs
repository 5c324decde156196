//! The local runner: PostgreSQL, the broker and the five services on one machine (`up`,
//! `infra`, `down`), the whole test suite against them (`test`), and fault injection under
//! load (`chaos`).

/// `eprintln!` that never panics: a runner whose terminal or pipe went away (`platform test |
/// head`, a closed SSH session) must still stop what it started, not die on its next line with
/// PostgreSQL or the broker left running.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that never panics, for the same reason as [`say!`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod chaos;
pub mod infra;
pub mod services;
pub mod tools;

use std::path::PathBuf;

/// The workspace's root directory: this crate is `platform/runner/` in it.
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or(manifest)
}

/// Where the local platform keeps its state (the database cluster, the broker's storage,
/// logs): `PLATFORM_STATE_DIR`, or `.platform/` in the workspace.
pub fn state_dir() -> PathBuf {
    std::env::var_os("PLATFORM_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".platform"))
}
