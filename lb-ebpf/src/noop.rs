//! Programs that do nothing, so `cargo xtask bench` can measure the floor of each hook (the cost
//! of running any program there) in the same run as xlb's programs. Never attached by the agent.

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[classifier]
pub fn noop_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[xdp]
pub fn noop_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
