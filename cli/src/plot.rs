//! `--plot`: the latency distributions of a load test as an SVG (plotters).

use std::path::Path;

use plotters::prelude::*;

use crate::loadtest::LoadReport;
use plugbus::host::Hist;

/// Points (latency µs, fraction of samples at or below it) of a histogram's CDF.
fn cdf(h: &Hist) -> Vec<(f64, f64)> {
    let total = h.count().max(1) as f64;
    let mut seen = 0u64;
    h.inner()
        .iter_recorded()
        .map(|v| {
            seen += v.count_at_value();
            (v.value_iterated_to() as f64 / 1000.0, seen as f64 / total)
        })
        .collect()
}

/// Draws the CDFs of publish-to-observe (moves and events), reply round trip and host cost per
/// tick, on a log latency axis.
pub fn latency(r: &LoadReport, path: &Path) -> Result<(), String> {
    let series = [
        ("publish -> observe (moves)", cdf(&r.samples.observe), BLUE),
        (
            "end_tick -> observe (moves)",
            cdf(&r.samples.observe_from_end_tick),
            CYAN,
        ),
        (
            "publish -> observe (critical events)",
            cdf(&r.samples.observe_events),
            GREEN,
        ),
        ("reply round trip", cdf(&r.samples.rtt), RED),
        ("host cost per tick", cdf(&r.samples.tick), BLACK),
    ];
    let max = series
        .iter()
        .flat_map(|(_, pts, _)| pts.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let title = format!(
        "plugbus loadtest: {} players x {} tps x {} plugins, wait {}{}",
        r.players,
        r.tps,
        r.plugins,
        r.wait,
        if r.pinned.is_some() { ", pinned" } else { "" }
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((0.01f64..max * 1.5).log_scale(), 0.0f64..1.0)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("latency, µs (log)")
        .y_desc("fraction of samples ≤ x")
        .draw()
        .map_err(|e| e.to_string())?;
    for (name, pts, color) in series {
        if pts.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
