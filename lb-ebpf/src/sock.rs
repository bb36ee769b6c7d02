//! Socket load balancing (cgroup sock_addr hooks): not written yet (issue 11).

/// See `lb_common::global_names::HOST_NETNS_COOKIE`: set by the agent at load time.
#[unsafe(no_mangle)]
static XLB_HOST_NETNS_COOKIE: u64 = 0;
