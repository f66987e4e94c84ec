//! `herald-chart`: draws PNG charts from the JSON-lines results written by `herald-bench`.
//!
//! Each input line is one benchmark run (`scenario`, `target`, `label`, `connections`,
//! `rate_offered`, `rate_achieved`, `deliveries_per_sec`, `latency_us{p50,p90,p99,p999,max,mean}`,
//! `rss_per_connection_bytes`; other fields are ignored, missing ones default). Three charts are
//! drawn into the output directory:
//!
//! - `latency-vs-rate.png`: fan-out runs with a fixed offered rate; x = offered deliveries/s
//!   (publications/s × connections, log), y = p50 (solid) and p99 (dashed) latency in ms (log),
//!   one colour per (target, label, connections).
//! - `memory-vs-connections.png`: idle runs; x = connections (log), y = RSS per connection (KiB),
//!   one line per (target, label).
//! - `throughput.png`: fan-out runs at rate 0 (as fast as possible); deliveries/s per
//!   connection count, one bar per (target, label): Herald next to the reference server.
//! - `deliveries-vs-publishers.png`: the publisher sweep of `scripts/bench publishers` (labels
//!   `pub: N http: SERVER` or `pub: sweep N http: SERVER`, 2,000 subscribers, rate 0); x = HTTP
//!   publisher connections, each posting one publication per request (log), y = deliveries/s,
//!   one line per server (the mean of its runs at each x).
//!
//! Runs labelled `pub: ...` appear only in the last chart.
//!
//! A chart without data is skipped with a note on stderr. Text is rendered with DejaVu Sans
//! (Debian package `fonts-dejavu-core`), loaded at run time.
//!
//! ```text
//! herald-chart --input bench/results/results.jsonl --out-dir bench/results/
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Deserialize;

/// The font every chart's text is drawn with.
const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// Chart size in pixels.
const SIZE: (u32, u32) = (1280, 800);
/// Series colours (the "tab10" palette).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Command line.
#[derive(Parser, Debug)]
#[command(name = "herald-chart", version, about = "Draws PNG charts from herald-bench results.")]
struct Args {
    /// JSON-lines file written by herald-bench (one run per line).
    #[arg(long, default_value = "bench/results/results.jsonl")]
    input: PathBuf,
    /// Directory the PNG files are written to (created if missing).
    #[arg(long, default_value = "bench/results/")]
    out_dir: PathBuf,
}

/// Latency percentiles of a run, in microseconds.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(default)]
struct Latency {
    p50: f64,
    p99: f64,
}

/// One benchmark run, as written by herald-bench (only the fields the charts use).
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(default)]
struct Run {
    scenario: String,
    target: String,
    label: String,
    connections: f64,
    rate_offered: f64,
    deliveries_per_sec: f64,
    latency_us: Option<Latency>,
    rss_per_connection_bytes: Option<f64>,
}

impl Run {
    /// A run of `scripts/bench publishers` (label `pub: SHAPE: SERVER`).
    fn is_publishers(&self) -> bool {
        self.label.starts_with("pub: ")
    }

    /// For a publisher-sweep run (`pub: [sweep ]N http: SERVER`): N and SERVER.
    fn http_publishers(&self) -> Option<(f64, String)> {
        let rest = self.label.strip_prefix("pub: ")?;
        let (shape, server) = rest.split_once(": ")?;
        let n = shape.strip_prefix("sweep ").unwrap_or(shape).strip_suffix(" http")?;
        Some((n.parse::<u32>().ok()? as f64, server.to_string()))
    }

    /// The series name: the label, or the target when there is no label.
    fn name(&self) -> String {
        if self.label.is_empty() {
            self.target.clone()
        } else if self.label.starts_with(&self.target) {
            self.label.clone()
        } else {
            format!("{} {}", self.target, self.label)
        }
    }
}

fn main() -> std::process::ExitCode {
    match run(&Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald-chart: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Reads the results and draws the charts.
fn run(args: &Args) -> Result<()> {
    register_font()?;
    let runs = read_runs(&args.input)?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    for path in render_all(&runs, &args.out_dir)? {
        println!("{}", path.display());
    }
    Ok(())
}

/// Registers DejaVu Sans as plotters' `sans-serif` family (once per process).
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT_PATH).map_err(|e| {
                format!(
                    "cannot read the font {FONT_PATH} ({e}); install the Debian package \
                     fonts-dejavu-core (apt-get install fonts-dejavu-core)"
                )
            })?;
            // plotters keeps a `&'static [u8]`: the font lives as long as the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{FONT_PATH} is not a usable TrueType font"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Reads the JSON-lines results, skipping blank lines.
fn read_runs(path: &Path) -> Result<Vec<Run>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a benchmark run", path.display(), i + 1))
        })
        .collect()
}

/// Draws one chart into a file; false when there is no data for it (nothing is written).
type ChartFn = fn(&[Run], &Path) -> Result<bool>;

/// Draws every chart that has data; returns the files written.
fn render_all(runs: &[Run], out_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let charts: [(&str, ChartFn); 4] = [
        ("latency-vs-rate.png", latency_vs_rate),
        ("memory-vs-connections.png", memory_vs_connections),
        ("throughput.png", throughput),
        ("deliveries-vs-publishers.png", deliveries_vs_publishers),
    ];
    for (file, draw) in charts {
        let path = out_dir.join(file);
        if draw(runs, &path).with_context(|| format!("drawing {}", path.display()))? {
            written.push(path);
        } else {
            eprintln!("herald-chart: no data for {file}, skipped");
        }
    }
    Ok(written)
}

/// Points grouped by series, sorted by x; duplicate x values are averaged.
type Series = BTreeMap<SeriesKey, Vec<(f64, Vec<f64>)>>;

/// What identifies a series; orders series by name, then by connection count.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SeriesKey {
    name: String,
    /// The connection count when series differ by it, else 0.
    connections: u64,
}

impl std::fmt::Display for SeriesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.connections {
            0 => f.write_str(&self.name),
            n => write!(f, "{} ({} conns)", self.name, si(n as f64)),
        }
    }
}

/// A series key without connection count.
fn key(name: String) -> SeriesKey {
    SeriesKey { name, connections: 0 }
}

/// Groups `(series, x, ys)` triples into [`Series`].
fn group(points: impl Iterator<Item = (SeriesKey, f64, Vec<f64>)>) -> Series {
    // Per series, per x (by its bits): x, the sums of the ys, the number of runs summed.
    type Sums = (f64, Vec<f64>, usize);
    let mut acc: BTreeMap<SeriesKey, BTreeMap<u64, Sums>> = BTreeMap::new();
    for (name, x, ys) in points {
        let slot =
            acc.entry(name).or_default().entry(x.to_bits()).or_insert((x, vec![0.0; ys.len()], 0));
        for (sum, y) in slot.1.iter_mut().zip(&ys) {
            *sum += y;
        }
        slot.2 += 1;
    }
    acc.into_iter()
        .map(|(name, by_x)| {
            let mut points: Vec<(f64, Vec<f64>)> = by_x
                .into_values()
                .map(|(x, sums, n)| (x, sums.into_iter().map(|s| s / n as f64).collect()))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            (name, points)
        })
        .collect()
}

/// The range of `values` widened by `factor` on both sides (for log axes); `None` when empty.
fn log_range(values: impl Iterator<Item = f64>, factor: f64) -> Option<std::ops::Range<f64>> {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    (hi > 0.0).then(|| lo / factor..hi * factor)
}

/// `1.5M`, `20k`, `750`: a compact label for counts and rates.
fn si(v: f64) -> String {
    let (value, suffix) = match v.abs() {
        a if a >= 1e9 => (v / 1e9, "G"),
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let text = format!("{value:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{suffix}")
}

/// A latency in ms with as many decimals as its magnitude needs.
fn ms(v: f64) -> String {
    let text = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    };
    let trimmed =
        if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { &text };
    trimmed.to_string()
}

/// `latency-vs-rate.png`; false when there is no fan-out run at a fixed rate.
fn latency_vs_rate(runs: &[Run], path: &Path) -> Result<bool> {
    let series = group(
        runs.iter()
            .filter(|r| r.scenario == "fanout" && r.rate_offered > 0.0 && !r.is_publishers())
            .filter_map(|r| {
                let lat = r.latency_us.as_ref()?;
                // Log axis: a zero latency (no sample) is drawn at 1 µs.
                let p50 = (lat.p50 / 1000.0).max(0.001);
                let p99 = (lat.p99 / 1000.0).max(0.001);
                let name = SeriesKey { name: r.name(), connections: r.connections as u64 };
                Some((name, r.rate_offered * r.connections, vec![p50, p99]))
            }),
    );
    let points = || series.values().flatten();
    let (Some(x_range), Some(y_range)) = (
        log_range(points().map(|p| p.0), 1.3),
        log_range(points().flat_map(|p| p.1.iter().copied()), 1.5),
    ) else {
        return Ok(false);
    };

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Fan-out latency vs offered load", ("sans-serif", 30))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(x_range.log_scale(), y_range.log_scale())?;
    chart
        .configure_mesh()
        .x_desc("offered deliveries/s (publications/s × connections)")
        .y_desc("latency (ms)")
        .x_label_formatter(&|v| si(*v))
        .y_label_formatter(&|v| ms(*v))
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 16))
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let p50: Vec<(f64, f64)> = points.iter().map(|(x, ys)| (*x, ys[0])).collect();
        let p99: Vec<(f64, f64)> = points.iter().map(|(x, ys)| (*x, ys[1])).collect();
        chart
            .draw_series(LineSeries::new(p50.clone(), color.stroke_width(2)))?
            .label(format!("{name} p50"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(2)));
        chart.draw_series(p50.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
        chart
            .draw_series(DashedLineSeries::new(p99.clone(), 8, 5, color.stroke_width(2)))?
            .label(format!("{name} p99"))
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new([(0, 0), (9, 0)], color.stroke_width(2))
                    + PathElement::new([(15, 0), (24, 0)], color.stroke_width(2))
            });
        chart.draw_series(p99.iter().map(|p| TriangleMarker::new(*p, 5, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(true)
}

/// `memory-vs-connections.png`; false when there is no idle run with a memory figure.
fn memory_vs_connections(runs: &[Run], path: &Path) -> Result<bool> {
    let series =
        group(runs.iter().filter(|r| r.scenario == "idle" && r.connections > 0.0).filter_map(
            |r| Some((key(r.name()), r.connections, vec![r.rss_per_connection_bytes? / 1024.0])),
        ));
    line_chart(
        &series,
        path,
        &LineChart {
            caption: ("Memory per idle connection", 30),
            x_margin: 1.5,
            x_desc: "connections",
            y_desc: "RSS per connection (KiB)",
            x_label: &|v| si(*v),
            y_label: &|v, y_max| {
                if y_max >= 20.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            },
            value: &|y| format!("{y:.2}"),
            legend: SeriesLabelPosition::UpperRight,
        },
    )
}

/// How [`line_chart`] draws: texts, the log x axis's margin, formats, the legend's place.
struct LineChart<'a> {
    caption: (&'a str, u32),
    /// Factor the x range is widened by on both sides (log axis).
    x_margin: f64,
    x_desc: &'a str,
    y_desc: &'a str,
    x_label: &'a dyn Fn(&f64) -> String,
    /// A y label, given the axis's top.
    y_label: &'a dyn Fn(&f64, f64) -> String,
    /// The value written next to each point.
    value: &'a dyn Fn(f64) -> String,
    legend: SeriesLabelPosition,
}

/// One line per series (its first y), x on a log axis, y from 0, each point's value beside it;
/// false when there is no point.
fn line_chart(series: &Series, path: &Path, style: &LineChart<'_>) -> Result<bool> {
    let points = || series.values().flatten();
    let Some(x_range) = log_range(points().map(|p| p.0), style.x_margin) else {
        return Ok(false);
    };
    let y_max = points().map(|p| p.1[0]).fold(0.0f64, f64::max).max(1.0) * 1.15;

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(style.caption.0, ("sans-serif", style.caption.1))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(x_range.log_scale(), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc(style.x_desc)
        .y_desc(style.y_desc)
        .x_label_formatter(style.x_label)
        .y_label_formatter(&|v| (style.y_label)(v, y_max))
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 16))
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let line: Vec<(f64, f64)> = points.iter().map(|(x, ys)| (*x, ys[0])).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
            .label(name.to_string())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(2)));
        chart.draw_series(line.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
        // The value next to each point (offset in pixels so it does not cover the marker).
        let value_style = ("sans-serif", 15).into_font().color(&color);
        chart.draw_series(line.iter().map(|&(x, y)| {
            EmptyElement::at((x, y)) + Text::new((style.value)(y), (8, -20), value_style.clone())
        }))?;
    }
    chart
        .configure_series_labels()
        .position(style.legend.clone())
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(true)
}

/// `throughput.png`: grouped bars; false when there is no fan-out run at rate 0.
fn throughput(runs: &[Run], path: &Path) -> Result<bool> {
    let series = group(
        runs.iter()
            .filter(|r| {
                r.scenario == "fanout"
                    && r.rate_offered <= 0.0
                    && r.deliveries_per_sec > 0.0
                    && !r.is_publishers()
            })
            .map(|r| (key(r.name()), r.connections, vec![r.deliveries_per_sec])),
    );
    // The connection counts, in order: one group of bars each.
    let mut groups: Vec<f64> = series.values().flatten().map(|p| p.0).collect();
    groups.sort_by(f64::total_cmp);
    groups.dedup();
    if groups.is_empty() {
        return Ok(false);
    }
    let y_max = series.values().flatten().map(|p| p.1[0]).fold(0.0f64, f64::max) * 1.15;
    if y_max <= 0.0 {
        bail!("no positive throughput");
    }
    let n = groups.len() as f64;

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Fan-out throughput (publish as fast as possible)", ("sans-serif", 30))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..n, 0.0..y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_desc("connections")
        .y_desc("deliveries/s")
        .y_label_formatter(&|v| si(*v))
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 16))
        .draw()?;
    // One label under each group of bars, drawn on the root area (below the plotting area).
    let label_style =
        TextStyle::from(("sans-serif", 16).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, connections) in groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(si(*connections), (x, y + 8), label_style.clone()))?;
    }
    let width = 0.8 / series.len() as f64;
    for (j, (name, points)) in series.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        let bars: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|(c, ys)| {
                let g = groups.iter().position(|g| g == c)?;
                Some((g as f64 + 0.1 + j as f64 * width, ys[0]))
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|&(x, y)| {
                Rectangle::new([(x + 0.01 * width, 0.0), (x + 0.99 * width, y)], color.filled())
            }))?
            .label(name.to_string())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
        // The value centred above each bar.
        let value_style = TextStyle::from(("sans-serif", 15).into_font())
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        chart.draw_series(bars.iter().map(|&(x, y)| {
            Text::new(si(y), (x + 0.5 * width, y + y_max * 0.005), value_style.clone())
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(true)
}

/// `deliveries-vs-publishers.png`; false when there is no publisher-sweep run.
fn deliveries_vs_publishers(runs: &[Run], path: &Path) -> Result<bool> {
    let series = group(
        runs.iter().filter(|r| r.connections == 2000.0 && r.rate_offered <= 0.0).filter_map(|r| {
            let (n, server) = r.http_publishers()?;
            Some((key(server), n, vec![r.deliveries_per_sec]))
        }),
    );
    line_chart(
        &series,
        path,
        &LineChart {
            caption: (
                "Deliveries/s vs HTTP publishers (one publication per request, 2,000 subscribers)",
                26,
            ),
            x_margin: 1.3,
            x_desc: "publisher connections",
            y_desc: "deliveries/s",
            x_label: &|v| format!("{v:.0}"),
            y_label: &|v, _| si(*v),
            value: &si,
            legend: SeriesLabelPosition::UpperLeft,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(
        scenario: &str,
        target: &str,
        label: &str,
        conns: u64,
        rate: f64,
        extra: &str,
    ) -> String {
        format!(
            r#"{{"scenario":"{scenario}","target":"{target}","label":"{label}","connections":{conns},"rate_offered":{rate},"rate_achieved":{rate},{extra}}}"#
        )
    }

    #[test]
    fn renders_the_four_charts() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = Vec::new();
        for (target, label, factor) in
            [("herald", "herald ws", 1.6), ("reference", "reference", 1.0)]
        {
            for conns in [1_000u64, 10_000, 100_000] {
                let rss = 3000.0 * factor + 2_000_000.0 / conns as f64;
                lines.push(line(
                    "idle",
                    target,
                    label,
                    conns,
                    0.0,
                    &format!(r#""deliveries_per_sec":0,"rss_per_connection_bytes":{rss}"#),
                ));
                let dps = 4e6 / factor * (1.0 - conns as f64 / 1e6);
                lines.push(line("fanout", target, label, conns, 0.0, &format!(
                    r#""deliveries_per_sec":{dps},"latency_us":{{"p50":900,"p90":1500,"p99":4000,"p999":9000,"max":20000,"mean":1000}}"#
                )));
            }
            for conns in [1_000u64, 10_000] {
                for rate in [10.0, 100.0, 1000.0] {
                    let load = rate * conns as f64 / 1e6;
                    let p50 = 80.0 * factor * (1.0 + 20.0 * load * load);
                    lines.push(line("fanout", target, label, conns, rate, &format!(
                        r#""deliveries_per_sec":{},"latency_us":{{"p50":{p50},"p90":{},"p99":{},"p999":0,"max":0,"mean":0}}"#,
                        rate * conns as f64, p50 * 2.0, p50 * 5.0
                    )));
                }
            }
        }
        for n in [1u64, 2, 4, 8, 16] {
            for (target, server, dps) in
                [("herald", "herald", 1e6 * n as f64), ("reference", "reference", 2e6)]
            {
                let shape = if n == 8 { "8 http".to_string() } else { format!("sweep {n} http") };
                lines.push(line(
                    "fanout",
                    target,
                    &format!("pub: {shape}: {server}"),
                    2000,
                    0.0,
                    &format!(r#""deliveries_per_sec":{dps}"#),
                ));
            }
        }
        lines.push(String::new());
        lines.push(
            r#"{"scenario":"ingest","target":"herald","label":"x","extra_field":[1,2]}"#.into(),
        );
        let input = dir.path().join("results.jsonl");
        std::fs::write(&input, lines.join("\n")).unwrap();

        register_font().unwrap();
        let runs = read_runs(&input).unwrap();
        assert_eq!(runs.len(), 2 * (3 + 3 + 6) + 10 + 1);
        assert_eq!(runs.iter().filter_map(Run::http_publishers).count(), 10);
        let written = render_all(&runs, dir.path()).unwrap();
        assert_eq!(written.len(), 4);
        for name in [
            "latency-vs-rate.png",
            "memory-vs-connections.png",
            "throughput.png",
            "deliveries-vs-publishers.png",
        ] {
            let path = dir.path().join(name);
            let size = std::fs::metadata(&path).unwrap().len();
            assert!(size > 10_000, "{name}: only {size} bytes");
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name} is not a PNG");
        }
        if let Ok(keep) = std::env::var("HERALD_CHART_KEEP") {
            for path in &written {
                std::fs::copy(path, Path::new(&keep).join(path.file_name().unwrap())).unwrap();
            }
        }
    }

    #[test]
    fn charts_without_data_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        register_font().unwrap();
        let runs = vec![Run { scenario: "ingest".into(), ..Run::default() }];
        assert!(render_all(&runs, dir.path()).unwrap().is_empty());
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }

    #[test]
    fn labels() {
        assert_eq!(si(1_500_000.0), "1.5M");
        assert_eq!(si(20_000.0), "20k");
        assert_eq!(si(750.0), "750");
        assert_eq!(ms(0.25), "0.25");
        assert_eq!(ms(12.0), "12");
        assert_eq!(ms(150.0), "150");
    }
}
