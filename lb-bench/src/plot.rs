//! SVG plots against the number of Services (log scale), one line per mode / packet kind.
//! plotters' SVG backend with its built-in text metrics: no system fonts needed.

use std::path::Path;

use plotters::prelude::*;

use crate::results::Results;

type Series = Vec<(String, Vec<(f64, f64)>)>;

/// Draw every plot the results have data for; returns the failures (name, error).
pub fn draw_all(r: &Results, out: &Path) -> Vec<(String, anyhow::Error)> {
    let mut charts: Vec<(&str, &str, &str, Series)> = Vec::new();
    if let Some(d) = &r.datapath {
        let per_mode = |f: &dyn Fn(&crate::datapath::DpRow) -> f64| -> Series {
            crate::datapath::row_labels()
                .into_iter()
                .map(|label| {
                    let pts = d
                        .rows
                        .iter()
                        .filter(|row| row.mode == label)
                        .map(|row| (row.services as f64, f(row)))
                        .collect();
                    (label.to_string(), pts)
                })
                .filter(|(_, pts): &(String, Vec<(f64, f64)>)| !pts.is_empty())
                .collect()
        };
        charts.push((
            "conn_rate.svg",
            "New TCP connections per second to the last Service",
            "conn/s",
            per_mode(&|row| row.conn.conns_per_s),
        ));
        charts.push((
            "latency.svg",
            "Request latency p50 (connect + answer)",
            "µs",
            per_mode(&|row| row.conn.latency.p50_us),
        ));
        charts.push((
            "latency_p99.svg",
            "Request latency p99 (connect + answer)",
            "µs",
            per_mode(&|row| row.conn.latency.p99_us),
        ));
        for (backend, file, title) in [
            (
                "local",
                "conn_rate_nodeport_local.svg",
                "New TCP connections per second from outside to a NodePort, local backend",
            ),
            (
                "remote",
                "conn_rate_nodeport_remote.svg",
                "New TCP connections per second from outside to a NodePort, remote backend",
            ),
        ] {
            let series: Series = crate::datapath::external_labels()
                .into_iter()
                .map(|mode| {
                    let pts = d
                        .external
                        .iter()
                        .filter(|row| row.mode == mode && row.backend == backend)
                        .map(|row| (row.services as f64, row.conn.conns_per_s))
                        .collect();
                    (mode.to_string(), pts)
                })
                .filter(|(_, pts): &(String, Vec<(f64, f64)>)| !pts.is_empty())
                .collect();
            if !series.is_empty() {
                charts.push((file, title, "conn/s", series));
            }
        }
    }
    if let Some(p) = r.per_packet.as_ref().filter(|p| !p.rows.is_empty()) {
        let kind = |name: &str, f: &dyn Fn(&crate::pkt::PktRow) -> f64| {
            (
                name.to_string(),
                p.rows
                    .iter()
                    .map(|row| (row.services as f64, f(row)))
                    .collect::<Vec<_>>(),
            )
        };
        let series = vec![
            kind("established", &|r| r.established_ns),
            kind("new flow (SYN)", &|r| r.new_flow_ns),
            kind("reply", &|r| r.reply_ns),
            kind("non-Service", &|r| r.non_service_ns),
            kind("no-op floor", &|_| p.noop_ns),
        ];
        charts.push((
            "per_packet.svg",
            "Per-packet cost (BPF_PROG_TEST_RUN)",
            "ns per packet",
            series,
        ));
        for (hook, file, title, floor) in [
            (
                "xdp",
                "per_packet_xdp.svg",
                "Per-packet cost of from_net_xdp (XDP), NodePort from outside",
                p.noop_xdp_ns,
            ),
            (
                "tc",
                "per_packet_from_net_tc.svg",
                "Per-packet cost of from_net (tc ingress), NodePort from outside",
                Some(p.noop_ns),
            ),
        ] {
            let rows: Vec<&crate::pkt::ExtPktRow> =
                p.external.iter().filter(|r| r.hook == hook).collect();
            if rows.is_empty() {
                continue;
            }
            let kind = |name: &str, f: &dyn Fn(&crate::pkt::ExtPktRow) -> f64| {
                (
                    name.to_string(),
                    rows.iter()
                        .map(|row| (row.services as f64, f(row)))
                        .collect::<Vec<_>>(),
                )
            };
            let mut series = vec![
                kind("established, local", &|r| r.established_local_ns),
                kind("SYN, local", &|r| r.new_flow_local_ns),
                kind("established, remote (SNAT)", &|r| r.established_remote_ns),
                kind("SYN, remote (SNAT)", &|r| r.new_flow_remote_ns),
                kind("reply, remote", &|r| r.reply_remote_ns),
                kind("non-Service", &|r| r.non_service_ns),
            ];
            if let Some(floor) = floor {
                series.push(kind("no-op floor", &|_| floor));
            }
            charts.push((file, title, "ns per packet", series));
        }
    }
    charts
        .into_iter()
        .filter_map(|(file, title, y, series)| {
            line_chart(&out.join(file), title, y, &series)
                .err()
                .map(|e| (file.to_string(), e))
        })
        .collect()
}

/// A line chart with x = number of Services (log scale) and y from zero.
fn line_chart(path: &Path, title: &str, y_desc: &str, series: &Series) -> anyhow::Result<()> {
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (x_max, y_max) = points.fold((1.0f64, 0.0f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
    let root = SVGBackend::new(path, (860, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (0.8f64..x_max * 1.25).log_scale(),
            0f64..(y_max * 1.15).max(1.0),
        )?;
    chart
        .configure_mesh()
        .x_desc("Services")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_svg_with_one_line_per_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.svg");
        let series = vec![
            (
                "xlb".to_string(),
                vec![(1.0, 100.0), (1000.0, 101.0), (10000.0, 99.0)],
            ),
            (
                "iptables-legacy".to_string(),
                vec![(1.0, 90.0), (1000.0, 60.0), (10000.0, 20.0)],
            ),
        ];
        line_chart(&path, "title", "conn/s", &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.contains("iptables-legacy") && svg.contains("xlb"));
        assert!(svg.matches("<polyline").count() >= 2);
    }
}
