//! The testkit's error type: every failure says which command or step failed, so a broken test
//! environment (missing `ip`, no root, bpffs not mounted) is obvious from the test output.

use std::io;

/// Errors of the testkit (setup of namespaces, processes, manifests).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An external command ran but failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    /// An I/O step failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The agent did not become ready, exited, or could not be found.
    #[error("agent: {0}")]
    Agent(String),
    /// A manifest could not be read or rewritten.
    #[error("manifest {path}: {reason}")]
    Manifest { path: String, reason: String },
    /// `xlb inspect` output was not what the contract says.
    #[error("inspect output: {0}")]
    Inspect(String),
    /// Invalid use of the testkit (bad node index, name too long, ...).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach context to an `io::Error`.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}
