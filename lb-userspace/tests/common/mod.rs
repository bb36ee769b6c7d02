//! Shared by the root tests of lb-userspace.

use std::path::PathBuf;

use lb_userspace::datapath::cleanup;

/// A pin directory under /sys/fs/bpf removed (with everything pinned in it) on drop, even when
/// the test fails. `suite` and `tag` keep parallel tests apart.
pub struct Pins(pub PathBuf);

impl Pins {
    pub fn new(suite: &str, tag: &str) -> Self {
        let p = PathBuf::from(format!("/sys/fs/bpf/xlb-test-{suite}-{tag}-{}", std::process::id()));
        let _ = cleanup(&p);
        Pins(p)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = cleanup(&self.0);
    }
}
