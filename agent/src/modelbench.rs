//! `edgeloop-agent bench`: does this model fit this device? Loads an ONNX model the way the
//! agent does (parse, type, optimize, plan once), runs it on random inputs of the given
//! shapes and reports load time, latency percentiles and the process's peak resident memory.

use std::fmt::Write as _;
use std::str::FromStr;
use std::time::{Duration, Instant};

use edgeloop_shared::bundle::DType;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::runtime::datum_type;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("`{spec}` is not NAME:DIMS[:DTYPE] (for example `image:1x3x224x224:f32`): {reason}")]
    BadInputSpec { spec: String, reason: String },
    #[error("the model has no input named `{name}`; its inputs are: {known}")]
    UnknownInput { name: String, known: String },
    #[error("input `{name}` does not declare its {what}; give it with --input {name}:DIMS:DTYPE")]
    Undeclared { name: String, what: &'static str },
    #[error(
        "input `{name}` has dtype {dtype:?}, which the agent does not feed (f32, f64, i64, i32, u8, bool)"
    )]
    UnsupportedDType { name: String, dtype: DatumType },
    #[error("tract cannot load the model: {0}")]
    Load(String),
    #[error("inference failed: {0}")]
    Run(String),
    #[error("input `{name}` is declared as {declared}; --input gives {given}")]
    ShapeMismatch {
        name: String,
        declared: String,
        given: String,
    },
    #[error("--runs must be at least 1")]
    NoRuns,
}

/// Most elements of one benchmark input (1 GiB of f32).
pub const MAX_INPUT_ELEMENTS: usize = 1 << 28;

/// `--input NAME:DIMS[:DTYPE]`: a concrete shape (and optionally a dtype) for one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: Option<DType>,
}

impl FromStr for InputSpec {
    type Err = BenchError;

    /// Read from the right, so that a name may itself hold colons (`input:0:1x4`).
    fn from_str(spec: &str) -> Result<Self, BenchError> {
        let bad = |reason: &str| BenchError::BadInputSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let mut parts: Vec<&str> = spec.rsplitn(3, ':').collect();
        parts.reverse();
        let dtype = match parts.as_slice() {
            [_, _, last] => match DType::parse(last) {
                Some(d) => Some(d),
                // `image:1x3:f16`: an unknown dtype, not a name with a colon.
                None if !last.contains('x') && last.parse::<usize>().is_err() => {
                    return Err(bad(&format!(
                        "unknown dtype `{last}` (f32, f64, i64, i32, u8, bool)"
                    )));
                }
                None => {
                    // `a:b:1x4`: the name is `a:b`.
                    let (name, dims) = spec.rsplit_once(':').expect("three parts");
                    parts = vec![name, dims];
                    None
                }
            },
            [_, _] => None,
            _ => return Err(bad("missing the dimensions")),
        };
        let (name, dims) = (parts[0], parts[1]);
        if name.is_empty() {
            return Err(bad("empty input name"));
        }
        let dims = dims
            .split('x')
            .map(|d| d.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad("dimensions are positive integers joined by `x`"))?;
        if dims.contains(&0) {
            return Err(bad("a dimension of 0 makes an empty tensor"));
        }
        if dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .is_none_or(|n| n > MAX_INPUT_ELEMENTS)
        {
            return Err(bad(&format!(
                "more than {MAX_INPUT_ELEMENTS} elements in one input"
            )));
        }
        Ok(InputSpec {
            name: name.to_string(),
            dims,
            dtype,
        })
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub inputs: Vec<InputSpec>,
    /// Timed runs.
    pub runs: usize,
    /// Untimed runs before them.
    pub warmup: usize,
    /// Threads tract's matrix multiplications may split across (1: the calling thread).
    pub threads: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            inputs: Vec::new(),
            runs: 100,
            warmup: 3,
            threads: 1,
        }
    }
}

/// One input or output as it was run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorDesc {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl TensorDesc {
    fn shape_text(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(ToString::to_string).collect();
        if dims.is_empty() {
            "scalar".into()
        } else {
            dims.join("x")
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Parse, type, optimize and plan, in milliseconds.
    pub load_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub runs: usize,
    pub warmup: usize,
    pub threads: usize,
    /// Peak resident set of this process (Linux `VmHWM`), in KiB; `None` elsewhere.
    pub peak_rss_kb: Option<u64>,
    pub inputs: Vec<TensorDesc>,
    pub outputs: Vec<TensorDesc>,
    /// Symbolic dimensions set to 1 because no `--input` gave them.
    pub defaulted: Vec<String>,
}

impl BenchReport {
    /// Human-readable lines.
    pub fn text(&self, model: &str) -> String {
        let mut out = String::new();
        let list = |ts: &[TensorDesc]| {
            ts.iter()
                .map(|t| format!("{} {} {}", t.name, t.dtype, t.shape_text()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(out, "model     {model}");
        let _ = writeln!(out, "inputs    {}", list(&self.inputs));
        let _ = writeln!(out, "outputs   {}", list(&self.outputs));
        for d in &self.defaulted {
            let _ = writeln!(out, "note      {d}");
        }
        let _ = writeln!(
            out,
            "load      {:.1} ms (parse, type, optimize, plan)",
            self.load_ms
        );
        let _ = writeln!(
            out,
            "latency   p50 {:.3} ms  p99 {:.3} ms  mean {:.3} ms  min {:.3} ms  max {:.3} ms  ({} runs after {} warm-up, {} thread{})",
            self.p50_ms,
            self.p99_ms,
            self.mean_ms,
            self.min_ms,
            self.max_ms,
            self.runs,
            self.warmup,
            self.threads,
            if self.threads == 1 { "" } else { "s" }
        );
        match self.peak_rss_kb {
            Some(kb) => {
                let _ = writeln!(out, "peak RSS  {kb} KiB");
            }
            None => {
                let _ = writeln!(out, "peak RSS  unknown on this system");
            }
        }
        out
    }
}

/// An ONNX model planned for concrete input shapes: the loader behind `bench` and the
/// model compatibility suite.
#[derive(Debug)]
pub struct ShapedModel {
    plan: Arc<TypedRunnableModel>,
    /// Inputs in the graph's order, with the dtype and shape the plan was made for.
    pub inputs: Vec<(String, DatumType, Vec<usize>)>,
    /// The graph's output names, in order.
    pub outputs: Vec<String>,
    /// Symbolic dimensions set to 1 because no spec gave them.
    pub defaulted: Vec<String>,
}

impl ShapedModel {
    /// Parses, types, optimizes and plans `onnx` (with edgeloop's additional operators).
    /// Inputs named in `specs` get that shape (and dtype); the others keep what the graph
    /// declares, symbolic axes set to 1.
    pub fn load(onnx: &[u8], specs: &[InputSpec]) -> Result<Self, BenchError> {
        let load = |e: TractError| BenchError::Load(format!("{e:#}"));
        let mut model = crate::onnx_ops::onnx()
            .model_for_read(&mut std::io::Cursor::new(onnx))
            .map_err(load)?;
        let names: Vec<String> = model
            .input_outlets()
            .map_err(load)?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let outputs: Vec<String> = model
            .output_outlets()
            .map_err(load)?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map_or_else(|| model.node(o.node).name.clone(), str::to_string)
            })
            .collect();
        for spec in specs {
            if !names.contains(&spec.name) {
                return Err(BenchError::UnknownInput {
                    name: spec.name.clone(),
                    known: names.join(", "),
                });
            }
        }
        let mut inputs = Vec::with_capacity(names.len());
        let mut defaulted = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let fact = model.input_fact(i).map_err(load)?.clone();
            let given = specs.iter().find(|s| &s.name == name);
            let dtype = match given.and_then(|g| g.dtype) {
                Some(d) => datum_type(d),
                None => fact.datum_type.concretize().ok_or(BenchError::Undeclared {
                    name: name.clone(),
                    what: "dtype",
                })?,
            };
            let dims = match given {
                Some(g) => {
                    check_declared(name, &fact, &g.dims)?;
                    g.dims.clone()
                }
                None => {
                    if fact.shape.is_open() {
                        return Err(BenchError::Undeclared {
                            name: name.clone(),
                            what: "rank",
                        });
                    }
                    let mut dims = Vec::new();
                    for (axis, d) in fact.shape.dims().enumerate() {
                        match d
                            .concretize()
                            .and_then(|d| d.to_i64().ok())
                            .and_then(|d| usize::try_from(d).ok())
                        {
                            Some(n) => dims.push(n),
                            None => {
                                defaulted.push(format!(
                                    "input `{name}` axis {axis} is symbolic ({d:?}): set to 1"
                                ));
                                dims.push(1);
                            }
                        }
                    }
                    dims
                }
            };
            model = model
                .with_input_fact(i, InferenceFact::dt_shape(dtype, dims.as_slice()))
                .map_err(load)?;
            inputs.push((name.clone(), dtype, dims));
        }
        let plan = model
            .into_optimized()
            .and_then(|mut m| {
                crate::onnx_ops::index_tree_ensembles(&mut m)?;
                m.into_runnable()
            })
            .map_err(load)?;
        Ok(ShapedModel {
            plan,
            inputs,
            outputs,
            defaulted,
        })
    }

    /// Runs the plan on inputs in the graph's order.
    pub fn run(&self, inputs: TVec<TValue>) -> Result<TVec<TValue>, BenchError> {
        self.plan
            .run(inputs)
            .map_err(|e| BenchError::Run(format!("{e:#}")))
    }
}

/// Loads `onnx` with the given input shapes, then times `options.runs` inferences on
/// random inputs (fixed seed).
pub fn bench(onnx: &[u8], options: &BenchOptions) -> Result<BenchReport, BenchError> {
    if options.runs == 0 {
        return Err(BenchError::NoRuns);
    }
    if options.threads > 1 {
        let executor = tract_linalg::multithread::Executor::multithread(options.threads);
        return tract_linalg::multithread::multithread_tract_scope(executor, || {
            bench_here(onnx, options)
        });
    }
    bench_here(onnx, options)
}

fn bench_here(onnx: &[u8], options: &BenchOptions) -> Result<BenchReport, BenchError> {
    let started = Instant::now();
    let model = ShapedModel::load(onnx, &options.inputs)?;
    let load_ms = ms(started.elapsed());
    let ShapedModel {
        inputs, defaulted, ..
    } = &model;

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut tensors: TVec<TValue> = TVec::new();
    for (name, dtype, dims) in inputs {
        tensors.push(random_tensor(name, *dtype, dims, &mut rng)?.into_tvalue());
    }
    let run = || model.run(tensors.clone());
    let first = run()?;
    for _ in 1..options.warmup {
        run()?;
    }
    let mut times = Vec::with_capacity(options.runs);
    for _ in 0..options.runs {
        let t = Instant::now();
        let out = run()?;
        times.push(t.elapsed());
        drop(out);
    }
    times.sort();
    let total: Duration = times.iter().sum();
    Ok(BenchReport {
        load_ms,
        p50_ms: ms(percentile(&times, 0.50)),
        p99_ms: ms(percentile(&times, 0.99)),
        mean_ms: ms(total) / times.len() as f64,
        min_ms: ms(times[0]),
        max_ms: ms(times[times.len() - 1]),
        runs: options.runs,
        threads: options.threads.max(1),
        // The first run always happens (it reports the output shapes) and is not timed.
        warmup: options.warmup.max(1),
        peak_rss_kb: peak_rss_kb(),
        inputs: inputs
            .iter()
            .map(|(name, dtype, dims)| TensorDesc {
                name: name.clone(),
                dtype: dtype_name(*dtype),
                shape: dims.clone(),
            })
            .collect(),
        outputs: first
            .iter()
            .zip(&model.outputs)
            .map(|(t, name)| TensorDesc {
                name: name.clone(),
                dtype: dtype_name(t.datum_type()),
                shape: t.shape().to_vec(),
            })
            .collect(),
        defaulted: defaulted.clone(),
    })
}

/// A shape given on the command line must agree with the model's declared rank and
/// fixed axes; only symbolic axes are free.
fn check_declared(name: &str, fact: &InferenceFact, given: &[usize]) -> Result<(), BenchError> {
    if fact.shape.is_open() {
        return Ok(());
    }
    let declared: Vec<Option<i64>> = fact
        .shape
        .dims()
        .map(|d| d.concretize().and_then(|d| d.to_i64().ok()))
        .collect();
    let agrees = declared.len() == given.len()
        && declared
            .iter()
            .zip(given)
            .all(|(d, &g)| d.is_none_or(|d| d == g as i64));
    if agrees {
        return Ok(());
    }
    let text = |dims: Vec<String>| dims.join("x");
    Err(BenchError::ShapeMismatch {
        name: name.to_string(),
        declared: text(
            declared
                .iter()
                .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
                .collect(),
        ),
        given: text(given.iter().map(ToString::to_string).collect()),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn dtype_name(d: DatumType) -> String {
    match d {
        DatumType::F32 => "f32".into(),
        DatumType::F64 => "f64".into(),
        DatumType::I64 => "i64".into(),
        DatumType::I32 => "i32".into(),
        DatumType::U8 => "u8".into(),
        DatumType::Bool => "bool".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Random values of a dtype: floats in [0, 1), integers in [0, 8) (small enough to be valid
/// indices for most embedding and gather inputs), booleans at even odds.
fn random_tensor(
    name: &str,
    dtype: DatumType,
    dims: &[usize],
    rng: &mut impl Rng,
) -> Result<Tensor, BenchError> {
    let n: usize = dims.iter().product();
    let tensor = match dtype {
        DatumType::F32 => Tensor::from_shape(
            dims,
            &(0..n).map(|_| rng.random::<f32>()).collect::<Vec<_>>(),
        ),
        DatumType::F64 => Tensor::from_shape(
            dims,
            &(0..n).map(|_| rng.random::<f64>()).collect::<Vec<_>>(),
        ),
        DatumType::I64 => Tensor::from_shape(
            dims,
            &(0..n)
                .map(|_| rng.random_range(0..8i64))
                .collect::<Vec<_>>(),
        ),
        DatumType::I32 => Tensor::from_shape(
            dims,
            &(0..n)
                .map(|_| rng.random_range(0..8i32))
                .collect::<Vec<_>>(),
        ),
        DatumType::U8 => Tensor::from_shape(
            dims,
            &(0..n).map(|_| rng.random::<u8>()).collect::<Vec<_>>(),
        ),
        DatumType::Bool => Tensor::from_shape(
            dims,
            &(0..n).map(|_| rng.random::<bool>()).collect::<Vec<_>>(),
        ),
        other => {
            return Err(BenchError::UnsupportedDType {
                name: name.to_string(),
                dtype: other,
            });
        }
    };
    tensor.map_err(|e| BenchError::Run(format!("{e:#}")))
}

/// The process's peak resident set in KiB, from `/proc/self/status` (Linux).
pub fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL_V1: &[u8] = include_bytes!("../../controller/assets/vibration/model_v1.onnx");

    #[test]
    fn input_specs_read_from_the_right() {
        let s: InputSpec = "image:1x3x224x224".parse().unwrap();
        assert_eq!(
            (s.name.as_str(), s.dims, s.dtype),
            ("image", vec![1, 3, 224, 224], None)
        );
        let s: InputSpec = "ids:1x16:i64".parse().unwrap();
        assert_eq!(
            (s.name.as_str(), s.dims, s.dtype),
            ("ids", vec![1, 16], Some(DType::I64))
        );
        let s: InputSpec = "input:0:2x4".parse().unwrap();
        assert_eq!(
            (s.name.as_str(), s.dims, s.dtype),
            ("input:0", vec![2, 4], None)
        );
        let s: InputSpec = "input:0:2x4:u8".parse().unwrap();
        assert_eq!((s.name.as_str(), s.dtype), ("input:0", Some(DType::U8)));
        let err = "image:1x3:f16".parse::<InputSpec>().unwrap_err();
        assert!(err.to_string().contains("unknown dtype `f16`"), "{err}");
        let huge = "image:65536x65536x65536x65536";
        let err = huge.parse::<InputSpec>().unwrap_err();
        assert!(err.to_string().contains("elements"), "{err}");
        for bad in [
            "image",
            "image:",
            ":1x3",
            "image:1xx3",
            "image:0x3",
            "image:1x3:f16",
        ] {
            let err = bad.parse::<InputSpec>().unwrap_err();
            assert!(err.to_string().contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn the_example_model_is_timed_on_its_declared_shape() {
        let report = bench(
            MODEL_V1,
            &BenchOptions {
                runs: 20,
                ..BenchOptions::default()
            },
        )
        .unwrap();
        assert_eq!(report.runs, 20);
        assert!(report.load_ms > 0.0);
        assert!(report.min_ms <= report.p50_ms && report.p50_ms <= report.p99_ms);
        assert!(report.p99_ms <= report.max_ms);
        assert_eq!(report.inputs.len(), 1);
        assert_eq!(report.inputs[0].shape.last(), Some(&4));
        assert_eq!(report.outputs[0].dtype, "f32");
        assert_eq!(report.outputs[0].shape.last(), Some(&2));
        if cfg!(target_os = "linux") {
            assert!(report.peak_rss_kb.unwrap() > 1000);
        }
    }

    /// The example model's input name, as the loader reads it.
    fn input_name() -> String {
        ShapedModel::load(MODEL_V1, &[]).unwrap().inputs[0]
            .0
            .clone()
    }

    #[test]
    fn a_batch_of_eight_is_run_when_asked_for_on_two_threads() {
        let name = input_name();
        let report = bench(
            MODEL_V1,
            &BenchOptions {
                inputs: vec![format!("{name}:8x4").parse().unwrap()],
                runs: 3,
                warmup: 1,
                threads: 2,
            },
        )
        .unwrap();
        assert_eq!(report.inputs[0].shape, vec![8, 4]);
        assert_eq!(report.outputs[0].shape, vec![8, 2]);
        assert_eq!(report.threads, 2);
        assert!(
            report.text("m").contains("2 threads"),
            "{}",
            report.text("m")
        );
    }

    #[test]
    fn wrong_names_shapes_and_files_are_refused_clearly() {
        let err = bench(
            MODEL_V1,
            &BenchOptions {
                inputs: vec!["nope:1x4".parse().unwrap()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, BenchError::UnknownInput { .. }), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");
        let name = input_name();
        for shape in ["1x5", "1x4x1"] {
            let err = bench(
                MODEL_V1,
                &BenchOptions {
                    inputs: vec![format!("{name}:{shape}").parse().unwrap()],
                    ..Default::default()
                },
            )
            .unwrap_err();
            assert!(matches!(err, BenchError::ShapeMismatch { .. }), "{err}");
            assert!(err.to_string().contains(shape), "{err}");
        }
        let err = bench(b"not a model", &BenchOptions::default()).unwrap_err();
        assert!(matches!(err, BenchError::Load(_)), "{err}");
        let err = bench(
            MODEL_V1,
            &BenchOptions {
                runs: 0,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, BenchError::NoRuns));
    }
}
