//! Process metrics with the CPU time to the clock tick. The prometheus
//! crate's process collector counts whole seconds, which reads 0 for a
//! sidecar using 12 millicores; this one wraps it and replaces that one
//! series with seconds from `/proc/self/stat` ticks (10 ms on Linux).

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Opts};

const CPU: &str = "outrigger_process_cpu_seconds_total";

pub struct Process {
    inner: prometheus::process_collector::ProcessCollector,
    cpu: Counter,
    descs: Vec<Desc>,
}

impl Process {
    pub fn new() -> Result<Process, prometheus::Error> {
        let inner = prometheus::process_collector::ProcessCollector::new(
            std::process::id() as i32,
            "outrigger",
        );
        let cpu = Counter::with_opts(Opts::new(
            CPU,
            "Total user and system CPU time spent in seconds (to the clock tick).",
        ))?;
        let mut descs: Vec<Desc> = inner
            .desc()
            .into_iter()
            .filter(|d| d.fq_name != CPU)
            .cloned()
            .collect();
        descs.extend(cpu.desc().into_iter().cloned());
        Ok(Process { inner, cpu, descs })
    }

    fn seconds() -> Option<f64> {
        let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
        Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
    }
}

impl Collector for Process {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out: Vec<MetricFamily> = self
            .inner
            .collect()
            .into_iter()
            .filter(|m| m.name() != CPU)
            .collect();
        if let Some(now) = Self::seconds() {
            let past = self.cpu.get();
            if now > past {
                self.cpu.inc_by(now - past);
            }
        }
        out.extend(self.cpu.collect());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_has_sub_second_precision() {
        let p = Process::new().unwrap();
        // The process's CPU time can be a whole number of seconds at one
        // reading (the other tests run beside this one): a whole second at
        // every one of three readings, a burn apart, means whole seconds only.
        let mut readings = Vec::new();
        let mut fams = p.collect();
        for _ in 0..3 {
            // Burn a little CPU: well under a second.
            let mut x = 0u64;
            for i in 0..20_000_000u64 {
                x = x.wrapping_add(i * i);
            }
            assert!(x > 0);
            fams = p.collect();
            let cpu = fams.iter().find(|m| m.name() == CPU).unwrap();
            let v = cpu.get_metric()[0].get_counter().get_value();
            assert!(v > 0.0, "{v}");
            readings.push(v);
            if v.fract() != 0.0 {
                break;
            }
        }
        assert!(readings.iter().any(|v| v.fract() != 0.0), "{readings:?}");
        assert_eq!(fams.iter().filter(|m| m.name() == CPU).count(), 1);
    }
}
