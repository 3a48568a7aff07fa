//! ONNX operators that common exporters write and tract 0.23 cannot run, added to the ONNX
//! op registry that every load in edgeloop goes through ([`onnx`]): the agent's runtime, the
//! controller's check at publish time and `edgeloop-agent bench`.
//!
//! - `ai.onnx.ml.Scaler` (skl2onnx's output for StandardScaler, MinMaxScaler, RobustScaler,
//!   …): `(x - offset) * scale` per feature, as standard tract ops.
//! - `ai.onnx.ml.TreeEnsembleClassifier` with two classes and a single base value
//!   (scikit-learn's binary GradientBoostingClassifier): tract refuses the single base
//!   value, and would pick the label from the wrong column. The trees still run in tract's
//!   own operator; the base value, the logistic transform, the two probabilities and the
//!   label are wired here as onnxruntime computes them: `z = sum + base`,
//!   `p = sigmoid(z)`, probabilities `[1 - p, p]`, the second class when `z > 0`.
//!
//! Every other TreeEnsembleClassifier goes to tract's own builder unchanged.
//! - `ai.onnx.ml.TreeEnsembleRegressor` of one target (scikit-learn's RandomForestRegressor,
//!   GradientBoostingRegressor, …), which tract does not register: its trees are read as a
//!   one-class TreeEnsembleClassifier by tract's own builder (the leaves' `target_*`
//!   attributes as `class_*`), so they run in tract's operator (and its indexed form,
//!   [`index_tree_ensembles`]); the sum of the leaves plus `base_values` is the value, as
//!   onnxruntime computes it. `AVERAGE` aggregation divides by the number of trees. Other
//!   aggregations, transforms and several targets are refused by name.

use std::sync::OnceLock;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::expandable::{Expansion, expand};

/// tract's ONNX framework with edgeloop's additional operators.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register.insert("Scaler", scaler);
    onnx.op_register
        .insert("TreeEnsembleClassifier", tree_ensemble_classifier);
    onnx.op_register
        .insert("TreeEnsembleRegressor", tree_ensemble_regressor);
    onnx
}

type Built = (Box<dyn InferenceOp>, Vec<String>);

fn floats<'a>(node: &'a NodeProto, name: &str) -> Option<&'a [f32]> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.floats.as_slice())
}

fn string_attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a [u8]> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.s.as_slice())
}

fn scaler(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<Built> {
    let offset = floats(node, "offset").unwrap_or(&[0.0]);
    let scale = floats(node, "scale").unwrap_or(&[1.0]);
    let offset = if offset.is_empty() {
        &[0.0][..]
    } else {
        offset
    };
    let scale = if scale.is_empty() { &[1.0][..] } else { scale };
    Ok((
        expand(Scaler {
            offset: rctensor1(offset),
            scale: rctensor1(scale),
        }),
        vec![],
    ))
}

/// `ai.onnx.ml.Scaler`: `y = (x - offset) * scale` along the last axis, in f32. `offset` and
/// `scale` hold one value per feature, or one for all.
#[derive(Debug, Clone)]
struct Scaler {
    offset: Arc<Tensor>,
    scale: Arc<Tensor>,
}

impl Expansion for Scaler {
    fn name(&self) -> StaticName {
        "Scaler".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let fact = model.outlet_fact(inputs[0])?.clone();
        let rank = fact.rank();
        ensure!(rank >= 1, "Scaler needs an input of rank 1 or more");
        let mut x = inputs[0];
        if fact.datum_type != f32::datum_type() {
            x = model.wire_node(
                format!("{prefix}.cast"),
                tract_core::ops::cast::cast(f32::datum_type()),
                &[x],
            )?[0];
        }
        // Constants of the input's rank, the values along the last axis.
        let along_last = |t: &Tensor| -> TractResult<Tensor> {
            let mut shape = vec![1; rank];
            shape[rank - 1] = t.len();
            t.clone().into_shape(&shape)
        };
        let offset = model.add_const(format!("{prefix}.offset"), along_last(&self.offset)?)?;
        x = model.wire_node(
            format!("{prefix}.sub"),
            tract_core::ops::math::sub(),
            &[x, offset],
        )?[0];
        let scale = model.add_const(format!("{prefix}.scale"), along_last(&self.scale)?)?;
        model.wire_node(
            format!("{prefix}.mul"),
            tract_core::ops::math::mul(),
            &[x, scale],
        )
    }
}

/// tract's own TreeEnsembleClassifier builder.
fn tract_tree_builder() -> fn(&ParsingContext, &NodeProto) -> TractResult<Built> {
    static BUILDER: OnceLock<fn(&ParsingContext, &NodeProto) -> TractResult<Built>> =
        OnceLock::new();
    *BUILDER.get_or_init(|| {
        *tract_onnx::onnx()
            .op_register
            .0
            .get("TreeEnsembleClassifier")
            .expect("tract registers TreeEnsembleClassifier")
    })
}

fn tree_ensemble_classifier(ctx: &ParsingContext, node: &NodeProto) -> TractResult<Built> {
    let builder = tract_tree_builder();
    let labels = node
        .attribute
        .iter()
        .find(|a| a.name == "classlabels_int64s" || a.name == "classlabels_strings")
        .map(|a| {
            if a.name == "classlabels_int64s" {
                rctensor1(&a.ints)
            } else {
                rctensor1(
                    &a.strings
                        .iter()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect::<Vec<_>>(),
                )
            }
        });
    let base = floats(node, "base_values");
    let logistic = string_attr(node, "post_transform") == Some(b"LOGISTIC".as_slice());
    let (Some(labels), Some(&[base]), true) = (labels, base, logistic) else {
        return builder(ctx, node);
    };
    // Only the layout this wrapper reproduces: every leaf scores the first class (so that
    // tract's trees give `[1 - sum, sum]`), with weights of both signs (onnxruntime treats
    // all-positive weights as probabilities, another layout). Anything else goes to tract.
    let class_ids = node
        .attribute
        .iter()
        .find(|a| a.name == "class_ids")
        .map(|a| a.ints.as_slice())
        .unwrap_or(&[]);
    let weights = floats(node, "class_weights").unwrap_or(&[]);
    if labels.len() != 2
        || class_ids.is_empty()
        || class_ids.iter().any(|&c| c != 0)
        || weights.iter().all(|&w| w >= 0.0)
    {
        return builder(ctx, node);
    }
    // The trees alone, through tract: no base value, no transform. For two classes whose
    // leaves all score the first class, tract's scores are then `[1 - sum, sum]`.
    let mut trees = node.clone();
    trees
        .attribute
        .retain(|a| a.name != "base_values" && a.name != "post_transform");
    let (inner, closures) = builder(ctx, &trees)?;
    let Some(inner) = inner.as_op().downcast_ref::<Box<dyn Expansion>>() else {
        bail!("tract's TreeEnsembleClassifier is not an expansion any more");
    };
    Ok((
        expand(BinaryTreeClassifier {
            trees: inner.clone(),
            base,
            labels,
        }),
        closures,
    ))
}

fn tree_ensemble_regressor(ctx: &ParsingContext, node: &NodeProto) -> TractResult<Built> {
    let ints = |name: &str| {
        node.attribute
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.ints.as_slice())
    };
    let targets = node
        .attribute
        .iter()
        .find(|a| a.name == "n_targets")
        .map_or(1, |a| a.i);
    ensure!(
        targets == 1,
        "TreeEnsembleRegressor of {targets} targets: edgeloop runs tree regressors of one target"
    );
    let transform = string_attr(node, "post_transform").unwrap_or(b"NONE");
    ensure!(
        transform == b"NONE",
        "TreeEnsembleRegressor with post_transform {}: only NONE is supported",
        String::from_utf8_lossy(transform)
    );
    let aggregate = string_attr(node, "aggregate_function").unwrap_or(b"SUM");
    let tree_count = ints("nodes_treeids")
        .and_then(|ids| ids.iter().max())
        .map_or(1, |&max| max + 1);
    let divide = match aggregate {
        b"SUM" => 1.0,
        b"AVERAGE" => tree_count as f32,
        other => bail!(
            "TreeEnsembleRegressor with aggregate_function {}: only SUM and AVERAGE are supported",
            String::from_utf8_lossy(other)
        ),
    };
    let base = match floats(node, "base_values") {
        None | Some([]) => 0.0,
        Some(&[base]) => base,
        Some(more) => bail!(
            "TreeEnsembleRegressor with {} base values for one target",
            more.len()
        ),
    };
    // The same trees as a classifier of one class, `0`, that every leaf scores.
    let mut trees = node.clone();
    trees.op_type = "TreeEnsembleClassifier".into();
    trees.attribute.retain(|a| {
        !matches!(
            a.name.as_str(),
            "n_targets" | "post_transform" | "aggregate_function" | "base_values"
        )
    });
    for a in &mut trees.attribute {
        if let Some(rest) = a.name.strip_prefix("target_") {
            a.name = format!("class_{rest}");
        }
        if a.name == "class_weights" && divide != 1.0 {
            for w in &mut a.floats {
                *w /= divide;
            }
        }
    }
    let mut labels = tract_onnx::pb::AttributeProto {
        name: "classlabels_int64s".into(),
        ints: vec![0],
        ..Default::default()
    };
    labels.r#type = tract_onnx::pb::attribute_proto::AttributeType::Ints as i32;
    trees.attribute.push(labels);
    let (inner, closures) = tract_tree_builder()(ctx, &trees)?;
    let Some(inner) = inner.as_op().downcast_ref::<Box<dyn Expansion>>() else {
        bail!("tract's TreeEnsembleClassifier is not an expansion any more");
    };
    Ok((
        expand(TreeRegressor {
            trees: inner.clone(),
            base,
        }),
        closures,
    ))
}

/// A one-target tree ensemble regressor: the trees' sum plus the base value, `[N, 1]`.
#[derive(Debug, Clone)]
struct TreeRegressor {
    /// The trees as tract's one-class classifier, whose scores are `[1 - sum, sum]`.
    trees: Box<dyn Expansion>,
    base: f32,
}

impl Expansion for TreeRegressor {
    fn name(&self) -> StaticName {
        "TreeEnsembleRegressor".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, DatumType::F32)?;
        s.equals(&outputs[0].rank, 2)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[0].shape[1], 1.to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let trees = self.trees.wire(&format!("{prefix}.trees"), model, inputs)?;
        Ok(tvec!(sum_plus_base(prefix, model, trees[1], self.base)?))
    }
}

/// The leaves' sum plus `base`, `[N, 1]`, from the scores `[1 - sum, sum]` tract's
/// classifier gives for trees whose leaves all score its first class.
fn sum_plus_base(
    prefix: &str,
    model: &mut TypedModel,
    scores: OutletId,
    base: f32,
) -> TractResult<OutletId> {
    use tract_core::ops::array::Slice;
    let sum = model.wire_node(format!("{prefix}.sum"), Slice::new(1, 1, 2), &[scores])?;
    let base = model.add_const(format!("{prefix}.base"), rctensor2(&[[base]]))?;
    Ok(model.wire_node(
        format!("{prefix}.plus_base"),
        tract_core::ops::math::add(),
        &[sum[0], base],
    )?[0])
}

/// Two-class tree ensemble with one base value and a logistic transform, as onnxruntime
/// computes it. Outputs: the label (one per row) and the probabilities `[N, 2]`.
#[derive(Debug, Clone)]
struct BinaryTreeClassifier {
    trees: Box<dyn Expansion>,
    base: f32,
    labels: Arc<Tensor>,
}

impl Expansion for BinaryTreeClassifier {
    fn name(&self) -> StaticName {
        "BinaryTreeEnsembleClassifier".into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(2)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 2)?;
        s.equals(&outputs[0].datum_type, self.labels.datum_type())?;
        s.equals(&outputs[1].datum_type, DatumType::F32)?;
        s.equals(&outputs[0].rank, 1)?;
        s.equals(&outputs[1].rank, 2)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[1].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[1].shape[1], 2.to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        use tract_core::ops::array::TypedConcat;
        use tract_core::ops::nn::{Reduce, Reducer};
        let trees = self.trees.wire(&format!("{prefix}.trees"), model, inputs)?;
        let z = [sum_plus_base(prefix, model, trees[1], self.base)?];
        let p = model.wire_node(
            format!("{prefix}.logistic"),
            tract_core::ops::nn::sigmoid(),
            &z,
        )?;
        let one = model.add_const(format!("{prefix}.one"), rctensor2(&[[1f32]]))?;
        let q = model.wire_node(
            format!("{prefix}.complement"),
            tract_core::ops::math::sub(),
            &[one, p[0]],
        )?;
        let probabilities = model.wire_node(
            format!("{prefix}.probabilities"),
            TypedConcat::new(1),
            &[q[0], p[0]],
        )?;
        // The second class when `z > 0`, as onnxruntime decides (not from the rounded
        // probabilities): the argmax of `[-z, z]`, whose tie at 0 goes to the first class.
        let zero = model.add_const(format!("{prefix}.zero"), rctensor2(&[[0f32]]))?;
        let minus_z = model.wire_node(
            format!("{prefix}.minus_z"),
            tract_core::ops::math::sub(),
            &[zero, z[0]],
        )?;
        let sides = model.wire_node(
            format!("{prefix}.sides"),
            TypedConcat::new(1),
            &[minus_z[0], z[0]],
        )?;
        let winner = model.wire_node(
            format!("{prefix}.argmax"),
            Reduce::new(tvec!(1), Reducer::ArgMax(false)),
            &sides,
        )?;
        let winner = model.wire_node(
            format!("{prefix}.rm_axis"),
            tract_core::ops::change_axes::AxisOp::Rm(1),
            &winner,
        )?;
        let winner = model.wire_node(
            format!("{prefix}.as_index"),
            tract_core::ops::cast::cast(i32::datum_type()),
            &winner,
        )?;
        let label = model.wire_node(
            format!("{prefix}.label"),
            tract_onnx_opl::ml::category_mapper::DirectLookup::new(
                self.labels.clone(),
                Tensor::zero_dt(self.labels.datum_type(), &[])?.into_arc_tensor(),
            )?,
            &winner,
        )?;
        Ok(tvec!(label[0], probabilities[0]))
    }
}

/// Replaces every tree ensemble of an optimized model by [`IndexedTreeEnsemble`], which
/// evaluates the same trees (the same data, the same comparisons and aggregation) with
/// direct indexing. tract 0.23 finds each reached leaf's votes by stepping an iterator over
/// every vote before them, so a forest's cost grows with the square of its size: about
/// 0.1 ms a row for ten trees of depth 4, where onnxruntime takes 6–9 µs.
pub fn index_tree_ensembles(model: &mut TypedModel) -> TractResult<()> {
    for id in 0..model.nodes.len() {
        let Some(op) = model.nodes[id]
            .op_as::<tract_onnx_opl::ml::tree_ensemble_classifier::TreeEnsembleClassifier>(
        ) else {
            continue;
        };
        let input = model.outlet_fact(model.nodes[id].inputs[0])?;
        if input.rank() != 2 {
            continue;
        }
        let ensemble = op.ensemble.clone();
        model.nodes[id].op = Box::new(IndexedTreeEnsemble { ensemble });
    }
    Ok(())
}

/// A tree ensemble classifier over tract's [`TreeEnsemble`] data, for inputs of shape
/// `[batch, features]`: scores `[batch, classes]` in f32, as tract's operator computes them.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct IndexedTreeEnsemble {
    ensemble: tract_onnx_opl::ml::tree_ensemble_classifier::TreeEnsemble,
}

impl Op for IndexedTreeEnsemble {
    fn name(&self) -> StaticName {
        "TreeEnsembleClassifier (indexed)".into()
    }

    op_as_typed_op!();
}

impl EvalOp for IndexedTreeEnsemble {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        use tract_onnx_opl::ml::tree_ensemble_classifier::Aggregate;
        let input = args_1!(inputs);
        let input = input.cast_to::<f32>()?;
        ensure!(
            input.rank() == 2,
            "tree ensemble input must be [batch, features]"
        );
        let (rows, width) = (input.shape()[0], input.shape()[1]);
        let ensemble = &self.ensemble;
        ensure!(
            width > ensemble.max_used_feature,
            "the input has {width} features; the trees use feature #{}",
            ensemble.max_used_feature
        );
        let x = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let trees = ensemble.data.trees.try_as_plain_ram()?.as_slice::<u32>()?;
        let nodes = ensemble.data.nodes.try_as_plain_ram()?.as_slice::<u32>()?;
        let leaves = ensemble.data.leaves.try_as_plain_ram()?.as_slice::<u32>()?;
        let classes = ensemble.n_classes;
        let mut scores = vec![0f32; rows * classes];
        let mut votes = vec![0u32; classes];
        for (row, out) in x.chunks_exact(width).zip(scores.chunks_exact_mut(classes)) {
            for &root in trees {
                let mut node = root as usize;
                // A node is 5 words: feature, true, false, threshold bits, flags (the low
                // byte is the comparison, 0 for a leaf, whose words 0 and 1 are its votes'
                // range; 0x100: a missing value goes the true way).
                loop {
                    let n = nodes
                        .get(node * 5..node * 5 + 5)
                        .ok_or_else(|| format_err!("tree node {node} out of range"))?;
                    let cmp = n[4] & 0xFF;
                    if cmp == 0 {
                        for vote in n[0] as usize..n[1] as usize {
                            let v = leaves
                                .get(vote * 2..vote * 2 + 2)
                                .ok_or_else(|| format_err!("tree vote {vote} out of range"))?;
                            let (class, weight) = (v[0] as usize, f32::from_bits(v[1]));
                            let total = out
                                .get_mut(class)
                                .ok_or_else(|| format_err!("tree vote for class {class}"))?;
                            match ensemble.aggregate_fn {
                                Aggregate::Sum => *total += weight,
                                Aggregate::Avg => {
                                    *total += weight;
                                    votes[class] += 1;
                                }
                                Aggregate::Max => *total = total.max(weight),
                                Aggregate::Min => *total = total.min(weight),
                            }
                        }
                        break;
                    }
                    let value = row[n[0] as usize];
                    let threshold = f32::from_bits(n[3]);
                    let go_true = if value.is_nan() {
                        n[4] & 0x100 != 0
                    } else {
                        match cmp {
                            1 => value == threshold,
                            2 => value != threshold,
                            3 => value < threshold,
                            4 => value > threshold,
                            5 => value <= threshold,
                            6 => value >= threshold,
                            other => bail!("tree node {node}: comparison {other}"),
                        }
                    };
                    node = if go_true { n[1] } else { n[2] } as usize;
                }
            }
            if ensemble.aggregate_fn == Aggregate::Avg {
                for (total, count) in out.iter_mut().zip(&mut votes) {
                    if *count > 1 {
                        *total /= *count as f32;
                    }
                    *count = 0;
                }
            }
        }
        Ok(tvec!(
            Tensor::from_shape(&[rows, classes], &scores)?.into_tvalue()
        ))
    }
}

impl TypedOp for IndexedTreeEnsemble {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = &inputs[0].shape[0];
        Ok(tvec!(f32::fact(&[
            n.clone(),
            self.ensemble.n_classes.into()
        ])))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOREST: &[u8] = include_bytes!("../tests/compat/random_forest.onnx");
    const BOOSTED: &[u8] = include_bytes!("../tests/compat/gradient_boosting.onnx");

    fn optimized(bytes: &[u8], rows: usize) -> TypedModel {
        onnx()
            .model_for_read(&mut std::io::Cursor::new(bytes))
            .and_then(|m| m.with_input_fact(0, f32::fact([rows, 4]).into()))
            .and_then(|m| m.into_optimized())
            .unwrap()
    }

    fn op_names(model: &TypedModel) -> Vec<String> {
        model
            .nodes
            .iter()
            .map(|n| n.op.name().to_string())
            .collect()
    }

    /// The indexed evaluator gives tract's own scores, bit for bit, on rows spread over
    /// and beyond the trees' thresholds, with missing values, in one batch.
    #[test]
    fn indexed_trees_score_exactly_as_tract_does() {
        let rows = 512;
        let mut state = 0x853c_49e6_748f_ea9b_u64;
        let values: Vec<f32> = (0..rows * 4)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if i % 37 == 0 {
                    f32::NAN
                } else {
                    (state >> 40) as f32 / (1u64 << 24) as f32 * 30.0 - 12.0
                }
            })
            .collect();
        for model in [FOREST, BOOSTED] {
            // And rows holding each threshold exactly, where `<` and `<=` part.
            let mut values = values.clone();
            let thresholds: Vec<(usize, f32)> = optimized(model, 1)
                .nodes
                .iter()
                .filter_map(|n| {
                    n.op_as::<tract_onnx_opl::ml::tree_ensemble_classifier::TreeEnsembleClassifier>(
                    )
                })
                .flat_map(|op| {
                    let nodes = op.ensemble.data.nodes.try_as_plain_ram().unwrap();
                    let nodes = nodes.as_slice::<u32>().unwrap().to_vec();
                    nodes
                        .chunks_exact(5)
                        .filter(|n| n[4] & 0xFF != 0)
                        .map(|n| (n[0] as usize, f32::from_bits(n[3])))
                        .collect::<Vec<_>>()
                })
                .collect();
            assert!(thresholds.len() > 10);
            for (row, (feature, threshold)) in thresholds.iter().enumerate() {
                values[(row % rows) * 4 + feature] = *threshold;
            }
            let input = Tensor::from_shape(&[rows, 4], &values).unwrap();
            let tract = optimized(model, rows);
            let mut indexed = tract.clone();
            index_tree_ensembles(&mut indexed).unwrap();
            let names = op_names(&indexed);
            assert!(
                names
                    .iter()
                    .any(|n| n == "TreeEnsembleClassifier (indexed)"),
                "{names:?}"
            );
            assert!(
                !names.iter().any(|n| n == "TreeEnsembleClassifier"),
                "{names:?}"
            );
            let run = |m: TypedModel| {
                m.into_runnable()
                    .unwrap()
                    .run(tvec!(input.clone().into()))
                    .unwrap()
            };
            let (want, got) = (run(tract), run(indexed));
            assert_eq!(want.len(), got.len());
            for (w, g) in want.iter().zip(&got) {
                assert_eq!(w.shape(), g.shape());
                let (w, g) = (
                    w.cast_to::<f32>().unwrap().into_owned(),
                    g.cast_to::<f32>().unwrap().into_owned(),
                );
                let w = w
                    .try_as_plain_ram()
                    .unwrap()
                    .as_slice::<f32>()
                    .unwrap()
                    .to_vec();
                let g = g
                    .try_as_plain_ram()
                    .unwrap()
                    .as_slice::<f32>()
                    .unwrap()
                    .to_vec();
                assert!(
                    w.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "scores differ"
                );
            }
        }
    }
}
