//! Minimal Ethernet/IPv4/TCP frames with valid checksums, for BPF_PROG_TEST_RUN.

/// TCP flag bits.
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const RST: u8 = 0x04;

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const TCP_LEN: usize = 20;
/// Payload bytes carried by every frame (a small request).
const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\n\r\n";

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn add_words(sum: &mut u32, bytes: &[u8]) {
    for c in bytes.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        *sum += u32::from(w);
    }
}

/// A TCP segment `src:sport -> dst:dport` with `flags` (no SYN payload).
pub fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let payload: &[u8] = if flags & SYN != 0 { &[] } else { PAYLOAD };
    let mut f = vec![0u8; ETH_LEN + IP_LEN + TCP_LEN + payload.len()];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[ETH_LEN..ETH_LEN + IP_LEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP_LEN + TCP_LEN + payload.len()) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let mut s = 0;
    add_words(&mut s, ip);
    let c = fold(s);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let t0 = ETH_LEN + IP_LEN;
    {
        let tcp = &mut f[t0..t0 + TCP_LEN];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
        tcp[8..12].copy_from_slice(&(if flags & ACK != 0 { 1u32 } else { 0 }).to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    }
    f[t0 + TCP_LEN..].copy_from_slice(payload);
    let mut s = 0;
    add_words(&mut s, &src);
    add_words(&mut s, &dst);
    s += 6 + (TCP_LEN + payload.len()) as u32;
    add_words(&mut s, &f[t0..]);
    let c = fold(s);
    f[t0 + 16..t0 + 18].copy_from_slice(&c.to_be_bytes());
    f
}

/// Destination address and port of a frame built by [`tcp`] (after the program rewrote it).
pub fn dst_of(frame: &[u8]) -> Option<([u8; 4], u16)> {
    let ip = frame.get(ETH_LEN + 16..ETH_LEN + 20)?;
    let port = frame.get(ETH_LEN + IP_LEN + 2..ETH_LEN + IP_LEN + 4)?;
    Some((ip.try_into().ok()?, u16::from_be_bytes([port[0], port[1]])))
}

/// Source address and port of a frame built by [`tcp`] (after the program rewrote it).
pub fn src_of(frame: &[u8]) -> Option<([u8; 4], u16)> {
    let ip = frame.get(ETH_LEN + 12..ETH_LEN + 16)?;
    let port = frame.get(ETH_LEN + IP_LEN..ETH_LEN + IP_LEN + 2)?;
    Some((ip.try_into().ok()?, u16::from_be_bytes([port[0], port[1]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(frame: &[u8]) -> bool {
        let ip = &frame[ETH_LEN..ETH_LEN + IP_LEN];
        let mut s = 0;
        add_words(&mut s, ip);
        let ip_ok = fold(s) == 0;
        let mut s = 0;
        add_words(&mut s, &ip[12..20]);
        let l4 = &frame[ETH_LEN + IP_LEN..];
        s += 6 + l4.len() as u32;
        add_words(&mut s, l4);
        ip_ok && fold(s) == 0
    }

    #[test]
    fn frames_carry_valid_checksums_and_addresses() {
        let syn = tcp([10, 244, 1, 2], 40000, [10, 96, 0, 10], 80, SYN);
        assert_eq!(syn.len(), 54);
        assert!(verify(&syn));
        let ack = tcp([10, 244, 1, 2], 40000, [10, 96, 0, 10], 80, ACK);
        assert_eq!(ack.len(), 54 + PAYLOAD.len());
        assert!(verify(&ack));
        assert_eq!(dst_of(&ack), Some(([10, 96, 0, 10], 80)));
        assert_eq!(src_of(&ack), Some(([10, 244, 1, 2], 40000)));
        let mut bad = ack.clone();
        bad[60] ^= 1;
        assert!(!verify(&bad));
    }
}
