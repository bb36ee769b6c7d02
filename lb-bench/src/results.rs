//! Everything one run measured, as written to `results.json` (and read back by the report and
//! plots, so they can be regenerated from a saved file).

use serde::{Deserialize, Serialize};

use crate::control::ColdResults;
use crate::datapath::DpResults;
use crate::pkt::PktResults;
use crate::sweep::SweepResults;
use crate::targets::TargetCheck;

/// The machine the numbers came from (ratios travel between machines, absolute numbers do not).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
}

impl Machine {
    pub fn detect() -> Self {
        let kernel = nix::sys::utsname::uname()
            .map(|u| {
                format!(
                    "{} {}",
                    u.sysname().to_string_lossy(),
                    u.release().to_string_lossy()
                )
            })
            .unwrap_or_default();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        Machine {
            kernel,
            cpu_model,
            cpus,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub quick: bool,
    pub machine: Machine,
    /// Unix time the run started.
    pub started_unix: u64,
    pub elapsed_s: f64,
    /// Seconds each phase took, in run order (absent in older results).
    #[serde(default)]
    pub phases_s: Vec<(String, f64)>,
    pub per_packet: Option<PktResults>,
    pub datapath: Option<DpResults>,
    pub cold: Option<ColdResults>,
    /// Sweeping a large conntrack map (absent in results from before it existed).
    #[serde(default)]
    pub sweep: Option<SweepResults>,
    pub targets: Vec<TargetCheck>,
    /// Phases that failed as a whole.
    pub errors: Vec<String>,
}
