//! The report: one row per figure, direct against tunnel, with the DESIGN.md target it is
//! held to; printed as a table and written as JSON.

use serde::Serialize;

/// How the tunnel figure is compared with the direct one.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum Compare {
    /// tunnel / direct, in percent (throughputs and rates).
    Ratio,
    /// tunnel − direct (latencies).
    Added,
    /// No direct counterpart.
    None,
}

/// A target from DESIGN.md.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", tag = "kind", content = "value")]
pub enum Target {
    /// tunnel / direct ≥ this many percent.
    RatioAtLeast(f64),
    /// tunnel − direct ≤ this.
    AddedAtMost(f64),
    /// tunnel ≤ this.
    AtMost(f64),
    /// tunnel ≥ this (counts: streams, sessions).
    AtLeast(f64),
}

impl Target {
    fn label(self, unit: &str) -> String {
        match self {
            Target::RatioAtLeast(p) => format!(">= {p:.0}%"),
            Target::AddedAtMost(v) => format!("<= +{v:.0} {unit}"),
            Target::AtMost(v) => format!("<= {v:.0} {unit}"),
            Target::AtLeast(v) => format!(">= {v:.0} {unit}"),
        }
    }
}

/// One figure of the report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub case: String,
    /// `expose`, `connect` or `gateway`.
    pub route: &'static str,
    pub unit: &'static str,
    pub direct: Option<f64>,
    pub tunnel: f64,
    pub compare: Compare,
    /// tunnel / direct in percent, or tunnel − direct, per `compare`.
    pub delta: Option<f64>,
    pub target: Option<Target>,
    pub meets: Option<bool>,
    /// CPU the processes used during the tunnel run, when measured.
    pub usage: Option<Usage>,
    /// Microseconds of CPU of both tunnel ends (proxy + agent, or a peer's server + client)
    /// per unit of work, for rate and throughput rows with `usage` ([`Row::cpu_per_unit`]).
    pub tunnel_cpu_per_unit: Option<f64>,
    /// Microseconds of this process' CPU per unit of work, likewise.
    pub bench_cpu_per_unit: Option<f64>,
    /// The unit of the two above: `us/req`, `us/conn` or `us/MB`.
    pub cpu_unit: Option<&'static str>,
}

/// CPU per unit of work of a rate or throughput row, in microseconds of CPU per request,
/// connection or MB: cores / rate × 10^6.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuPerUnit {
    /// Both tunnel ends: proxy + agent, or a peer's server + client.
    pub tunnel: f64,
    /// This process: the load generator and the upstream server.
    pub bench: f64,
    /// `us/req`, `us/conn` or `us/MB`.
    pub unit: &'static str,
}

/// CPU used during a run, in cores (CPU seconds / wall seconds).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Usage {
    pub wall_s: f64,
    pub proxy_cores: f64,
    pub agent_cores: f64,
    /// This process: the load generator and the upstream server.
    pub bench_cores: f64,
    /// The whole host busy, percent of all CPUs (other work on the machine included).
    pub host_busy_pct: f64,
    /// Busy cores not accounted to the three processes above: softirq time, and any other
    /// work on the machine (a shared machine shows up here).
    pub rest_cores: f64,
}

impl Usage {
    /// The CPU per unit of work at `rate` per second in `unit` (`req/s`, `conn/s` or `MB/s`);
    /// `None` for other units (latencies, memory) or a rate that is not positive.
    pub fn per_unit(&self, rate: f64, unit: &str) -> Option<CpuPerUnit> {
        let unit = match unit {
            "req/s" => "us/req",
            "conn/s" => "us/conn",
            "MB/s" => "us/MB",
            _ => return None,
        };
        (rate > 0.0).then(|| CpuPerUnit {
            tunnel: (self.proxy_cores + self.agent_cores) / rate * 1e6,
            bench: self.bench_cores / rate * 1e6,
            unit,
        })
    }
}

impl Row {
    pub fn new(
        case: impl Into<String>,
        route: &'static str,
        unit: &'static str,
        direct: Option<f64>,
        tunnel: f64,
        compare: Compare,
        target: Option<Target>,
    ) -> Row {
        let delta = match (compare, direct) {
            (Compare::Ratio, Some(d)) if d > 0.0 => Some(100.0 * tunnel / d),
            (Compare::Added, Some(d)) => Some(tunnel - d),
            _ => None,
        };
        let meets = target.map(|t| match t {
            Target::RatioAtLeast(p) => delta.is_some_and(|r| r >= p),
            Target::AddedAtMost(v) => delta.is_some_and(|a| a <= v),
            Target::AtMost(v) => tunnel <= v,
            Target::AtLeast(v) => tunnel >= v,
        });
        Row {
            case: case.into(),
            route,
            unit,
            direct,
            tunnel,
            compare,
            delta,
            target,
            meets,
            usage: None,
            tunnel_cpu_per_unit: None,
            bench_cpu_per_unit: None,
            cpu_unit: None,
        }
    }

    /// The row with `usage`, and the CPU per unit of work derived from it.
    pub fn with_usage(mut self, usage: Option<Usage>) -> Row {
        self.usage = usage;
        let c = self.cpu_per_unit();
        self.tunnel_cpu_per_unit = c.map(|c| c.tunnel);
        self.bench_cpu_per_unit = c.map(|c| c.bench);
        self.cpu_unit = c.map(|c| c.unit);
        self
    }

    /// The CPU per unit of work of a rate or throughput row with usage (see
    /// [`Usage::per_unit`]); `None` for latency and memory rows.
    pub fn cpu_per_unit(&self) -> Option<CpuPerUnit> {
        self.usage?.per_unit(self.tunnel, self.unit)
    }
}

/// Formats a number with a sensible precision for its size.
pub fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The rows as a fixed-width text table (also valid Markdown).
pub fn table(rows: &[Row]) -> String {
    let header = [
        "case",
        "route",
        "unit",
        "direct",
        "tunnel",
        "vs direct",
        "target",
        "met",
        "cores proxy/agent/bench, host busy",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        let delta = match (r.compare, r.delta) {
            (Compare::Ratio, Some(p)) => format!("{p:.1}%"),
            (Compare::Added, Some(a)) => format!("{}{}", if a >= 0.0 { "+" } else { "" }, num(a)),
            _ => "-".into(),
        };
        cells.push(vec![
            r.case.clone(),
            r.route.into(),
            r.unit.into(),
            r.direct.map(num).unwrap_or_else(|| "-".into()),
            num(r.tunnel),
            delta,
            r.target
                .map(|t| t.label(r.unit))
                .unwrap_or_else(|| "-".into()),
            match r.meets {
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
                None => "-".into(),
            },
            match r.usage {
                Some(u) => format!(
                    "{:.2}/{:.2}/{:.2}, {:.0}%",
                    u.proxy_cores, u.agent_cores, u.bench_cores, u.host_busy_pct
                ),
                None => "-".into(),
            },
        ]);
    }
    markdown_table(cells, 3)
}

/// `cells` (the header first) as a fixed-width Markdown table: the first `left` columns
/// left-aligned, the others right-aligned; short rows are padded with empty cells.
pub fn markdown_table(cells: Vec<Vec<String>>, left: usize) -> String {
    let cols = cells.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            cells
                .iter()
                .map(|c| c.get(i).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (n, row) in cells.iter().enumerate() {
        let line: Vec<String> = (0..cols)
            .map(|i| {
                let c = row.get(i).map(String::as_str).unwrap_or("");
                let pad = " ".repeat(widths[i] - c.chars().count());
                if i < left {
                    format!("{c}{pad}")
                } else {
                    format!("{pad}{c}")
                }
            })
            .collect();
        out.push_str(&format!("| {} |\n", line.join(" | ")));
        if n == 0 {
            let sep: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    if i < left {
                        "-".repeat(w + 2)
                    } else {
                        format!("{}:", "-".repeat(w + 1))
                    }
                })
                .collect();
            out.push_str(&format!("|{}|\n", sep.join("|")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_table() {
        let r = Row::new(
            "bulk",
            "expose",
            "MB/s",
            Some(1000.0),
            400.0,
            Compare::Ratio,
            Some(Target::RatioAtLeast(30.0)),
        );
        assert_eq!(r.delta, Some(40.0));
        assert_eq!(r.meets, Some(true));
        let r2 = Row::new(
            "rtt p50",
            "expose",
            "us",
            Some(20.0),
            60.0,
            Compare::Added,
            Some(Target::AddedAtMost(25.0)),
        );
        assert_eq!(r2.meets, Some(false));
        let t = table(&[r, r2]);
        assert_eq!(t.lines().count(), 4);
        assert!(t.contains("40.0%") && t.contains("+40.0") && t.contains("NO"));
    }

    #[test]
    fn cpu_per_unit() {
        let usage = Usage {
            wall_s: 2.0,
            proxy_cores: 0.6,
            agent_cores: 0.4,
            bench_cores: 0.5,
            host_busy_pct: 90.0,
            rest_cores: 0.3,
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        // 1 core of proxy + agent at 500 MB/s: 2000 us per MB; the bench's 0.5 core: 1000.
        let bulk = Row::new("bulk", "expose", "MB/s", None, 500.0, Compare::Ratio, None)
            .with_usage(Some(usage));
        let c = bulk.cpu_per_unit().unwrap();
        assert!(close(c.tunnel, 2000.0) && close(c.bench, 1000.0), "{c:?}");
        assert_eq!(c.unit, "us/MB");
        // 1 core at 20,000 req/s: 50 us per request.
        let http = Row::new(
            "http",
            "expose",
            "req/s",
            None,
            20_000.0,
            Compare::Ratio,
            None,
        )
        .with_usage(Some(usage));
        let c = http.cpu_per_unit().unwrap();
        assert!(close(c.tunnel, 50.0) && close(c.bench, 25.0) && c.unit == "us/req");
        // In the JSON, as camelCase fields next to the usage.
        let v = serde_json::to_value(&http).unwrap();
        assert!(close(v["tunnelCpuPerUnit"].as_f64().unwrap(), 50.0));
        assert!(close(v["benchCpuPerUnit"].as_f64().unwrap(), 25.0));
        assert_eq!(v["cpuUnit"], "us/req");
        assert_eq!(v["usage"]["proxy_cores"], 0.6);
        // Latency rows and rows without usage have none.
        let rtt = Row::new("rtt", "expose", "us", None, 60.0, Compare::Added, None)
            .with_usage(Some(usage));
        assert!(rtt.cpu_per_unit().is_none() && rtt.tunnel_cpu_per_unit.is_none());
        let bare = Row::new("bulk", "expose", "MB/s", None, 500.0, Compare::Ratio, None);
        assert!(bare.cpu_per_unit().is_none());
        assert!(serde_json::to_value(&bare).unwrap()["cpuUnit"].is_null());
    }
}
