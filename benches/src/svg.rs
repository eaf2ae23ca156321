//! Hand-written SVG charts (no fonts or system libraries needed to write
//! them; the viewer renders the text).

use std::fmt::Write as _;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend.
    pub name: String,
    /// Points in data units.
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Logarithmic x axis (base 10).
    pub x_log: bool,
    /// Lines.
    pub series: Vec<Series>,
    /// Lines on a second y axis (right), with its label.
    pub y2: Option<(String, Vec<Series>)>,
}

const W: f64 = 880.0;
const H: f64 = 480.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A color per system name, stable across charts.
pub fn color_for(name: &str) -> &'static str {
    match name {
        "walcast" => COLORS[0],
        "debezium" => COLORS[1],
        "polling" => COLORS[2],
        "kafka-limit" => COLORS[3],
        "pg-recvlogical" => COLORS[4],
        "pg-drain" => COLORS[5],
        "debezium-heartbeat" => COLORS[6],
        // timeline plots (short names: the legend is 200 px wide)
        "acks per 10 ms" => COLORS[0],
        "in flight" => COLORS[3],
        _ => COLORS[7],
    }
}

/// Round tick positions covering `[lo, hi]`.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return vec![lo];
    }
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut v = Vec::new();
    let mut t = (lo / step).floor() * step;
    while t <= hi + step * 1e-9 {
        if t >= lo - step * 1e-9 {
            v.push(t);
        }
        t += step;
    }
    v
}

/// A number for an axis label: `1.5k`, `2M`, `0.25`.
pub fn short(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = if x.fract().abs() < 1e-9 || x.abs() >= 10.0 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    };
    format!("{s}{suffix}")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart {
    /// Renders the chart as a standalone SVG document.
    pub fn render(&self) -> String {
        let y2_series: &[Series] = self.y2.as_ref().map_or(&[], |(_, s)| s.as_slice());
        let pts = self
            .series
            .iter()
            .chain(y2_series)
            .flat_map(|s| s.points.iter());
        let xs: Vec<f64> = pts
            .clone()
            .map(|p| p.0)
            .filter(|x| !self.x_log || *x > 0.0)
            .collect();
        let ys: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .collect();
        let y2_max = y2_series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.05;
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="28" font-size="16" text-anchor="middle">{}</text>"#,
            (LEFT + W - RIGHT) / 2.0,
            esc(&self.title)
        );
        if xs.is_empty() {
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}">no data</text></svg>"#,
                W / 2.0,
                H / 2.0
            );
            return out;
        }
        let (mut x0, mut x1) = (
            xs.iter().copied().fold(f64::INFINITY, f64::min),
            xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        );
        let y1 = ys.iter().copied().fold(0.0f64, f64::max).max(1e-9) * 1.05;
        let y0 = 0.0;
        let x_ticks: Vec<f64> = if self.x_log {
            x0 = 10f64.powf(x0.log10().floor());
            x1 = 10f64.powf(x1.log10().ceil());
            if x1 <= x0 {
                x1 = x0 * 10.0;
            }
            let mut v = Vec::new();
            let mut t = x0;
            while t <= x1 * 1.0001 {
                v.push(t);
                t *= 10.0;
            }
            v
        } else {
            if x1 <= x0 {
                x1 = x0 + 1.0;
            }
            let t = nice_ticks(x0, x1, 8);
            x0 = x0.min(t[0]);
            t
        };
        let pw = W - LEFT - RIGHT;
        let ph = H - TOP - BOTTOM;
        let sx = |x: f64| -> f64 {
            if self.x_log {
                LEFT + (x.max(x0).log10() - x0.log10()) / (x1.log10() - x0.log10()) * pw
            } else {
                LEFT + (x - x0) / (x1 - x0) * pw
            }
        };
        let sy = |y: f64| -> f64 { TOP + ph - (y - y0) / (y1 - y0) * ph };
        let sy2 = |y: f64| -> f64 { TOP + ph - y / y2_max * ph };
        // grid and ticks
        for t in &x_ticks {
            let x = sx(*t);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                TOP + ph,
                TOP + ph + 18.0,
                short(*t)
            );
        }
        for t in nice_ticks(y0, y1, 6) {
            let y = sy(t);
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0,
                short(t)
            );
        }
        let _ = writeln!(
            out,
            r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 18.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            out,
            r#"<text x="20" y="{}" text-anchor="middle" transform="rotate(-90 20 {})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        // the second axis: ticks and label right of the plot, the legend further right
        let mut legend_x = LEFT + pw + 15.0;
        if let Some((label, _)) = &self.y2 {
            for t in nice_ticks(0.0, y2_max, 6) {
                let _ = writeln!(
                    out,
                    r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                    LEFT + pw + 6.0,
                    sy2(t) + 4.0,
                    short(t)
                );
            }
            let (x, y) = (LEFT + pw + 50.0, TOP + ph / 2.0);
            let _ = writeln!(
                out,
                r#"<text x="{x}" y="{y}" text-anchor="middle" transform="rotate(-90 {x} {y})">{}</text>"#,
                esc(label)
            );
            legend_x = LEFT + pw + 60.0;
        }
        let lines = self
            .series
            .iter()
            .map(|s| (s, false))
            .chain(y2_series.iter().map(|s| (s, true)));
        for (i, (s, right)) in lines.enumerate() {
            let color = color_for(&s.name);
            let path: Vec<String> = s
                .points
                .iter()
                .filter(|p| !self.x_log || p.0 > 0.0)
                .map(|(x, y)| {
                    let y = if right { sy2(*y) } else { sy(*y) };
                    format!("{:.1},{y:.1}", sx(*x))
                })
                .collect();
            if !path.is_empty() {
                let _ = writeln!(
                    out,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                    path.join(" ")
                );
            }
            let ly = TOP + 10.0 + i as f64 * 20.0;
            let name = if right && self.y2.is_some() {
                format!("{} (right)", s.name)
            } else {
                s.name.clone()
            };
            let lx = legend_x;
            let _ = writeln!(
                out,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
                lx + 20.0,
                lx + 26.0,
                ly + 4.0,
                esc(&name)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            nice_ticks(0.0, 100.0, 5),
            vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        assert_eq!(nice_ticks(0.0, 1.0, 4), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(1500.0), "1.5k");
        assert_eq!(short(2_000_000.0), "2M");
        assert_eq!(short(0.25), "0.25");
        assert_eq!(short(40.0), "40");
    }

    #[test]
    fn renders_a_valid_looking_document() {
        let c = Chart {
            title: "t <1>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_log: true,
            series: vec![Series {
                name: "walcast".into(),
                points: vec![(0.5, 0.1), (3.0, 0.5), (40.0, 1.0)],
            }],
            y2: None,
        };
        let svg = c.render();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;1&gt;"));
        assert!(svg.contains("<polyline"));
        let empty = Chart {
            series: vec![],
            ..c
        };
        assert!(empty.render().contains("no data"));
    }

    #[test]
    fn a_second_axis_scales_its_own_lines() {
        let c = Chart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "left".into(),
            x_log: false,
            series: vec![Series {
                name: "acks per 10 ms".into(),
                points: vec![(0.0, 10.0), (1.0, 10.0)],
            }],
            y2: Some((
                "right".into(),
                vec![Series {
                    name: "in flight".into(),
                    points: vec![(0.0, 10_000.0), (1.0, 10_000.0)],
                }],
            )),
        };
        let svg = c.render();
        assert!(svg.contains("in flight (right)"), "{svg}");
        assert!(svg.contains(">10k<"), "right ticks: {svg}");
        // Both lines reach near the top: each axis has its own scale.
        let tops: Vec<f64> = svg
            .lines()
            .filter(|l| l.starts_with("<polyline"))
            .map(|l| {
                let pts = l.split("points=\"").nth(1).unwrap();
                pts.split([',', ' ']).nth(1).unwrap().parse().unwrap()
            })
            .collect();
        assert_eq!(tops.len(), 2, "{svg}");
        assert!(tops.iter().all(|y| (*y - tops[0]).abs() < 1.0), "{tops:?}");
    }
}
