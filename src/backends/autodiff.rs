//! How each kernel of this module joins burn's autodiff graph: one way to record a step and
//! one way to hand its gradients back, so that every kernel's `Autodiff` half is its backward
//! formula and nothing else.

use burn::backend::Autodiff;
use burn::backend::Backend;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;

/// Computes `forward` on the inputs' inner tensors and records `step` on the graph. When any
/// input needs a gradient, `keep` receives the inputs and the output and returns what the
/// backward pass reads; otherwise the inputs go to `forward` by value and nothing is kept.
/// The tensor types do not carry `C`, the graph's checkpointing, so callers name it:
/// `record::<C, _, _, _>(...)`.
pub(crate) fn record<C, B, S, const N: usize>(
    step: S,
    inputs: [FloatTensor<Autodiff<B, C>>; N],
    forward: impl FnOnce([FloatTensor<B>; N]) -> FloatTensor<B>,
    keep: impl FnOnce([FloatTensor<B>; N], &FloatTensor<B>) -> S::State,
) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend,
    C: CheckpointStrategy,
    S: Backward<B, N>,
{
    let (primitives, nodes): (Vec<_>, Vec<_>) = inputs.into_iter().map(|t| t.into_parts()).unzip();
    let (Ok(primitives), Ok(nodes)) = (<[_; N]>::try_from(primitives), <[_; N]>::try_from(nodes))
    else {
        unreachable!("N inputs give N parts");
    };
    match step.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let output = forward(primitives.clone());
            let state = keep(primitives, &output);
            prep.finish(state, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(primitives)),
    }
}

/// The backward pass of a step with `N` inputs: `gradients` receives the step's state, the
/// output's gradient and which inputs need one, and returns them in input order (`None` where
/// not computed); each is added to its input's gradient.
pub(crate) fn backward<B: Backend, S, const N: usize>(
    ops: Ops<S, N>,
    grads: &mut Gradients,
    gradients: impl FnOnce(S, FloatTensor<B>, [bool; N]) -> [Option<FloatTensor<B>>; N],
) {
    let grad = grads.consume::<B>(&ops.node);
    let needs = ops.parents.each_ref().map(Option::is_some);
    let computed = gradients(ops.state, grad, needs);
    for (parent, gradient) in ops.parents.into_iter().zip(computed) {
        if let (Some(node), Some(gradient)) = (parent, gradient) {
            grads.register::<B>(node.id, gradient);
        }
    }
}
