//! The agent's log lines the benchmark reads (info level, `key=value` fields after the message,
//! as tracing's fmt layer writes them):
//!
//! - `maps updated ... micros=N sync_micros=S`: `micros` is the map writes of the plan alone
//!   (`Datapath::execute`), `sync_micros` the whole sync (absorb events, rebuild, plan,
//!   execute). A line without `sync_micros` comes from an agent older than issue 12, whose
//!   `micros` was the whole sync: the map writes alone are then not measured.
//! - `maps read back micros=N frontends=F backends=B`: reading the pinned maps back at start
//!   (restart), rev-NAT id recovery included.
//! - `startup phases parse_micros=.. model_micros=.. plan_micros=.. write_micros=..`: the split
//!   of the first sync, whatever fields the agent gives.
//!
//! A line that is not there means "not measured", never zero.

/// The value of field `key` (exactly that name: `micros` does not match `sync_micros=`) in a
/// log line; `None` without the field or when its value is no unsigned number.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|tok| {
        let (k, v) = tok.split_once('=')?;
        if k != key {
            return None;
        }
        v.trim_matches(|c: char| c == '"' || c == ',').parse().ok()
    })
}

/// The first line of `log` carrying `message` as its message (followed by fields or the end of
/// the line, so "maps updated" does not match "maps updated later").
pub fn first_line<'a>(log: &'a str, message: &str) -> Option<&'a str> {
    log.lines().find(|l| {
        l.match_indices(message).any(|(at, _)| {
            let after = &l[at + message.len()..];
            after.is_empty() || after.starts_with(' ')
        })
    })
}

/// The first map update of an agent run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FirstUpdate {
    /// Map writes alone (`Datapath::execute`); `None` from an agent older than the split.
    pub write_micros: Option<u64>,
    /// The whole sync.
    pub sync_micros: Option<u64>,
    pub ops: Option<u64>,
}

pub fn first_update(log: &str) -> Option<FirstUpdate> {
    let line = first_line(log, "maps updated")?;
    let micros = field(line, "micros");
    Some(match field(line, "sync_micros") {
        Some(sync) => FirstUpdate {
            write_micros: micros,
            sync_micros: Some(sync),
            ops: field(line, "ops"),
        },
        None => FirstUpdate {
            write_micros: None,
            sync_micros: micros,
            ops: field(line, "ops"),
        },
    })
}

/// `maps read back`: (micros, frontends, backends).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadBack {
    pub micros: u64,
    pub frontends: Option<u64>,
    pub backends: Option<u64>,
}

pub fn read_back(log: &str) -> Option<ReadBack> {
    let line = first_line(log, "maps read back")?;
    Some(ReadBack {
        micros: field(line, "micros")?,
        frontends: field(line, "frontends"),
        backends: field(line, "backends"),
    })
}

/// `startup phases`: every `<name>_micros=N` field, as (name, micros), in line order.
pub fn startup_phases(log: &str) -> Vec<(String, u64)> {
    let Some(line) = first_line(log, "startup phases") else {
        return Vec::new();
    };
    line.split_whitespace()
        .filter_map(|tok| {
            let (k, _) = tok.split_once('=')?;
            let name = k.strip_suffix("_micros")?;
            Some((name.to_string(), field(tok, k)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as tracing's fmt layer writes them (time, level, target, message, fields).
    const NEW: &str = "2026-11-30T15:00:00.000001Z  INFO xlb::agent: datapath loaded\n\
        2026-11-30T15:00:00.100000Z  INFO xlb::agent: maps read back micros=183412 frontends=10002 backends=100006\n\
        2026-11-30T15:00:01.000000Z  INFO xlb::agent: startup phases parse_micros=812000 model_micros=90500 plan_micros=41000 write_micros=150321\n\
        2026-11-30T15:00:01.000001Z  INFO xlb::agent: maps updated ops=330012 frontends=10002 backends=100006 sync_micros=1093821 micros=150321\n\
        2026-11-30T15:00:01.000002Z  INFO xlb::agent: agent ready\n\
        2026-11-30T15:00:02.000000Z  INFO xlb::agent: maps updated ops=1 frontends=10002 backends=100006 micros=9 sync_micros=40\n";

    #[test]
    fn the_new_lines_parse() {
        let u = first_update(NEW).unwrap();
        assert_eq!(
            u,
            FirstUpdate {
                write_micros: Some(150_321),
                sync_micros: Some(1_093_821),
                ops: Some(330_012)
            }
        );
        assert_eq!(
            read_back(NEW),
            Some(ReadBack {
                micros: 183_412,
                frontends: Some(10_002),
                backends: Some(100_006)
            })
        );
        assert_eq!(
            startup_phases(NEW),
            vec![
                ("parse".to_string(), 812_000),
                ("model".to_string(), 90_500),
                ("plan".to_string(), 41_000),
                ("write".to_string(), 150_321)
            ]
        );
    }

    /// Before helper B's split: `micros` was the whole sync, so the writes alone are not
    /// measured, and the lines that do not exist yet are not measured either (not zero).
    #[test]
    fn old_lines_leave_the_new_figures_unmeasured() {
        let old = "x INFO datapath loaded\nx INFO maps updated ops=12 frontends=3 backends=4 micros=1534\n\
                   x INFO agent ready\nx INFO maps updated ops=1 micros=9\n";
        assert_eq!(
            first_update(old),
            Some(FirstUpdate {
                write_micros: None,
                sync_micros: Some(1534),
                ops: Some(12)
            })
        );
        assert_eq!(read_back(old), None);
        assert!(startup_phases(old).is_empty());
        assert_eq!(first_update("agent ready"), None);
    }

    #[test]
    fn fields_match_whole_names_only() {
        let l = "maps updated sync_micros=70 micros=5";
        assert_eq!(field(l, "micros"), Some(5));
        assert_eq!(field(l, "sync_micros"), Some(70));
        assert_eq!(field("maps updated sync_micros=70", "micros"), None);
        assert_eq!(field("x micros=abc", "micros"), None);
        // Fields the agent might quote or end with a comma.
        assert_eq!(field("x micros=\"12\",", "micros"), Some(12));
        // The message must stand alone.
        assert_eq!(first_line("maps updatedx micros=1", "maps updated"), None);
        assert_eq!(
            first_line("a\nmaps read back", "maps read back"),
            Some("maps read back")
        );
        // A phases line with zero fields is still measured (the agent says the split is 0).
        assert_eq!(
            startup_phases("startup phases parse_micros=0 write_micros=12"),
            vec![("parse".to_string(), 0), ("write".to_string(), 12)]
        );
    }
}
