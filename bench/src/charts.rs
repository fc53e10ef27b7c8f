//! PNG charts of a report (plotters, pure-Rust font rendering with a TTF read at run time):
//! statement latency distribution per target, throughput against client count, and
//! database backends in use over time.

use std::path::Path;

use plotters::coord::CoordTranslate;
use plotters::prelude::*;

use crate::report::{Sample, Summary};

/// Fonts tried in turn (Debian's `fonts-dejavu-core`, which `scripts/setup` installs).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type ChartResult = Result<(), Box<dyn std::error::Error>>;

/// Makes the font available to plotters; false if none is installed.
pub fn load_font() -> bool {
    for path in FONTS {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// Writes every chart the samples allow into `dir`; returns the file names written.
pub fn write_all(
    dir: &Path,
    samples: &[Sample],
    summaries: &[Summary],
    targets: &[String],
) -> Vec<String> {
    let mut written = Vec::new();
    let mut attempt = |name: &str, result: ChartResult| match result {
        Ok(()) => written.push(name.to_owned()),
        Err(e) => eprintln!("chart {name} not written: {e}"),
    };
    for workload in ["steady", "churn", "burst"] {
        if samples
            .iter()
            .any(|s| s.workload == workload && !s.latency_curve.is_empty())
        {
            let name = format!("latency-{workload}.png");
            attempt(&name, latency(&dir.join(&name), workload, samples, targets));
        }
    }
    if summaries.iter().any(|s| s.workload == "scale") {
        attempt(
            "throughput-scale.png",
            throughput(&dir.join("throughput-scale.png"), summaries, targets),
        );
    }
    for workload in ["burst", "scale"] {
        if samples
            .iter()
            .any(|s| s.workload == workload && !s.backends.is_empty())
        {
            let name = format!("backends-{workload}.png");
            attempt(
                &name,
                backends(&dir.join(&name), workload, samples, targets),
            );
        }
    }
    written
}

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// The sample of `target` to draw for `workload`: the first round at the largest client count.
fn pick<'a>(samples: &'a [Sample], workload: &str, target: &str) -> Option<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.workload == workload && s.target == target)
        .max_by_key(|s| (s.clients, std::cmp::Reverse(s.round)))
}

/// Latency (µs, log scale) against percentile on a "nines" axis (0 = p0, 3 = p99.9).
fn latency(path: &Path, workload: &str, samples: &[Sample], targets: &[String]) -> ChartResult {
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let curves: Vec<(&String, Vec<(f64, f64)>)> = targets
        .iter()
        .filter_map(|t| {
            let s = pick(samples, workload, t)?;
            let points = s
                .latency_curve
                .iter()
                .map(|(q, v)| (-(1.0 - q).max(1e-4).log10(), (*v).max(1) as f64))
                .collect();
            Some((t, points))
        })
        .collect();
    let max = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, v)| *v))
        .fold(10.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{workload}: statement latency by percentile"),
            ("sans-serif", 24),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..3.05f64, (1f64..max * 1.5).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_label_formatter(&|x| format!("p{}", percentile_label(*x)))
        .draw()?;
    for (i, (target, points)) in curves.into_iter().enumerate() {
        line(&mut chart, target, i, points)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    Ok(())
}

fn percentile_label(nines: f64) -> String {
    let q = (1.0 - 10f64.powf(-nines)) * 100.0;
    if q >= 99.0 {
        format!("{q:.1}")
    } else {
        format!("{q:.0}")
    }
}

/// Median throughput against client count (log scale), one line per target.
fn throughput(path: &Path, summaries: &[Summary], targets: &[String]) -> ChartResult {
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let scale: Vec<&Summary> = summaries.iter().filter(|s| s.workload == "scale").collect();
    let max_clients = scale.iter().map(|s| s.clients).max().unwrap_or(10).max(10) as f64;
    let max_tps = scale.iter().map(|s| s.throughput).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "scale: throughput by concurrent clients",
            ("sans-serif", 24),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d((1f64..max_clients * 1.5).log_scale(), 0f64..max_tps * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("clients")
        .y_desc("transactions/s (median)")
        .draw()?;
    for (i, target) in targets.iter().enumerate() {
        let points: Vec<(f64, f64)> = scale
            .iter()
            .filter(|s| &s.target == target)
            .map(|s| (s.clients as f64, s.throughput))
            .collect();
        if points.is_empty() {
            continue;
        }
        chart.draw_series(PointSeries::of_element(
            points.clone(),
            4,
            color(i),
            &|c, s, st| Circle::new(c, s, st.filled()),
        ))?;
        line(&mut chart, target, i, points)?;
    }
    legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
    root.present()?;
    Ok(())
}

/// Database backends in use (not idle) over time during one run per target.
fn backends(path: &Path, workload: &str, samples: &[Sample], targets: &[String]) -> ChartResult {
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let runs: Vec<(&String, &Sample)> = targets
        .iter()
        .filter_map(|t| Some((t, pick(samples, workload, t)?)))
        .collect();
    let max_t = runs
        .iter()
        .flat_map(|(_, s)| s.backends.iter().map(|(t, _)| *t))
        .fold(1.0, f64::max);
    let max_n = runs
        .iter()
        .flat_map(|(_, s)| s.backends.iter().map(|(_, n)| f64::from(*n)))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{workload}: database backends in use over time"),
            ("sans-serif", 24),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_t, 0f64..max_n * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("backends not idle")
        .draw()?;
    for (i, (target, sample)) in runs.into_iter().enumerate() {
        let points: Vec<(f64, f64)> = sample
            .backends
            .iter()
            .map(|(t, n)| (*t, f64::from(*n)))
            .collect();
        line(&mut chart, target, i, points)?;
    }
    legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
    root.present()?;
    Ok(())
}

/// One target's line, in its colour, with its legend entry.
fn line<'a, CT: CoordTranslate<From = (f64, f64)>>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, CT>,
    target: &str,
    i: usize,
    points: Vec<(f64, f64)>,
) -> ChartResult {
    chart
        .draw_series(LineSeries::new(points, color(i).stroke_width(2)))?
        .label(target)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color(i).stroke_width(2)));
    Ok(())
}

/// The legend box, the same on every chart.
fn legend<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, CT>,
    position: SeriesLabelPosition,
) -> ChartResult {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(position)
        .draw()?;
    Ok(())
}
