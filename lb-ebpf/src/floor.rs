//! Probe programs that measure the floors under the new-flow (SYN) path, so a bench or a test
//! can tell how much of a SYN's cost is xlb's logic and how much the kernel primitives it must
//! use (`cargo xtask bench` runs them next to the per-packet rows, `lb-bench/src/pkt`). Never attached by the agent. Each parses the
//! frame as the real programs do and then does one primitive on the real maps:
//!
//! - `floor_parse`: the parse alone;
//! - `floor_ct_lookup`: one conntrack lookup of the packet's forward key (a miss for a new
//!   tuple: the first thing a SYN pays);
//! - `floor_ct_pair`: the two conntrack inserts of a new flow (forward and reply entry, as
//!   `conntrack::create` writes them), on fresh tuples;
//! - `floor_nat`: the DNAT of the packet to a fixed backend (direct stores and the two L4
//!   checksum helpers);
//! - `floor_ct_hit`: what no established packet can skip: one conntrack lookup that hits (the
//!   bench runs it on the established row's tracked tuple) and the DNAT to the entry's backend.
//!   No clock, no state update, no counters: the gap between this and the established row is
//!   all of xlb's own per-packet logic.

use aya_ebpf::{
    bindings::{BPF_ANY, TC_ACT_OK},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{CtValue, CT_REPLY};

use crate::{
    conntrack::forward_key,
    maps::CONNTRACK,
    nat, parse,
    parse::{Packet, Parsed},
};

#[inline(always)]
fn parsed(ctx: &TcContext) -> Option<Packet> {
    match parse::parse(ctx) {
        Ok(Parsed::L4(pkt)) => Some(pkt),
        _ => None,
    }
}

#[classifier]
pub fn floor_parse(ctx: TcContext) -> i32 {
    let _ = parsed(&ctx);
    TC_ACT_OK
}

#[classifier]
pub fn floor_ct_lookup(ctx: TcContext) -> i32 {
    if let Some(pkt) = parsed(&ctx) {
        // SAFETY: read at once.
        let hit = unsafe { CONNTRACK.get(&forward_key(&pkt)) }.is_some();
        if hit {
            return TC_ACT_OK + 1;
        }
    }
    TC_ACT_OK
}

#[classifier]
pub fn floor_ct_pair(ctx: TcContext) -> i32 {
    if let Some(pkt) = parsed(&ctx) {
        let key = forward_key(&pkt);
        let value = CtValue {
            backend_id: 1,
            nat_addr: pkt.daddr ^ 1,
            nat_port: pkt.dport,
            expires_ns: 1,
            ..CtValue::default()
        };
        let reply = lb_common::CtKey {
            saddr: value.nat_addr,
            daddr: pkt.saddr,
            sport: value.nat_port,
            dport: pkt.sport,
            dir: CT_REPLY,
            ..key
        };
        let _ = CONNTRACK.insert(&key, &value, BPF_ANY.into());
        let _ = CONNTRACK.insert(&reply, &value, BPF_ANY.into());
    }
    TC_ACT_OK
}

#[classifier]
pub fn floor_nat(ctx: TcContext) -> i32 {
    if let Some(pkt) = parsed(&ctx) {
        let _ = nat::dnat(&ctx, &pkt, pkt.daddr ^ 0x0100_0000, pkt.dport ^ 0x0100);
    }
    TC_ACT_OK
}

#[classifier]
pub fn floor_ct_hit(ctx: TcContext) -> i32 {
    if let Some(pkt) = parsed(&ctx) {
        // SAFETY: copied out at once.
        if let Some(ct) = unsafe { CONNTRACK.get(&forward_key(&pkt)) }.copied() {
            let _ = nat::dnat(&ctx, &pkt, ct.nat_addr, ct.nat_port);
            return TC_ACT_OK + 1;
        }
    }
    TC_ACT_OK
}
