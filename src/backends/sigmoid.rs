//! The logistic sigmoid and its gradient on every core, for the Flex backend.
//!
//! burn-flex evaluates both on the calling thread, and the GNN's coefficient head applies the
//! sigmoid to every channel of every edge (`E x d`). The arithmetic here is burn-flex's own
//! (`1 / (1 + exp(-x))` for `x >= 0`, `exp(x) / (1 + exp(x))` below, and
//! `g * s * (1 - s)` for the gradient), so the values are its values, bit for bit.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::Flex;
use burn::backend::ops::ActivationOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{DType, Tensor};

use super::autodiff::{backward, record};
use super::{contiguous, from_vec, is_flex, par_map};

/// `1 / (1 + exp(-x))`: our multi-threaded kernel on the CPU in f32, burn's elsewhere.
///
/// # Shapes
/// - `x`: any
/// - output: the shape of `x`
pub fn sigmoid<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() == DType::F32 && is_flex(&x.device()) {
        Tensor::from_dispatch(<Dispatch as SigmoidBackend>::sigmoid_all_cores(
            x.into_dispatch(),
        ))
    } else {
        burn::tensor::activation::sigmoid(x)
    }
}

/// The sigmoid as a backend extension, so that autodiff records our backward kernel.
#[backend_extension(Flex, Autodiff)]
pub trait SigmoidBackend: Backend {
    /// See [`sigmoid`].
    fn sigmoid_all_cores(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `grad * s * (1 - s)` for the output `s`; not itself differentiable.
    fn sigmoid_all_cores_backward(
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// burn-flex's f32 sigmoid: the branch keeps `exp` from overflowing.
#[inline]
fn sigmoid_f32(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

impl SigmoidBackend for Flex {
    fn sigmoid_all_cores(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 {
            return Flex::sigmoid(x);
        }
        let x = contiguous(x);
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let out = par_map(xs.len(), |range, dst| {
            for (o, &x) in dst.iter_mut().zip(&xs[range]) {
                o.write(sigmoid_f32(x));
            }
        });
        from_vec(out, &x)
    }

    fn sigmoid_all_cores_backward(
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if output.dtype() != DType::F32
            || grad.dtype() != DType::F32
            || output.shape() != grad.shape()
        {
            return Flex::sigmoid_backward(output, grad);
        }
        let (output, grad) = (contiguous(output), contiguous(grad));
        let ss = output.as_slice::<f32>().expect("contiguous f32");
        let gs = grad.as_slice::<f32>().expect("contiguous f32");
        let out = par_map(ss.len(), |range, dst| {
            for ((o, &s), &g) in dst.iter_mut().zip(&ss[range.clone()]).zip(&gs[range]) {
                o.write(g * s * (1.0 - s));
            }
        });
        from_vec(out, &output)
    }
}

impl<B: SigmoidBackend, C: CheckpointStrategy> SigmoidBackend for Autodiff<B, C> {
    fn sigmoid_all_cores(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SigmoidGrad;

        impl<B: SigmoidBackend> Backward<B, 1> for SigmoidGrad {
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                backward::<B, _, 1>(ops, grads, |output, grad, _| {
                    [Some(B::sigmoid_all_cores_backward(output, grad))]
                });
            }
        }

        record::<C, _, _, _>(
            SigmoidGrad,
            [x],
            |[x]| B::sigmoid_all_cores(x),
            |_, output| output.clone(),
        )
    }

    fn sigmoid_all_cores_backward(
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        FloatTensor::<Self>::new(B::sigmoid_all_cores_backward(
            output.into_primitive(),
            grad.into_primitive(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, TensorData, Tolerance};

    use super::*;

    #[test]
    fn is_burns_sigmoid_bit_for_bit_on_values_and_gradients() {
        let dev = Device::flex().autodiff();
        let exact = Tolerance::<f32>::rel_abs(0.0, 0.0);
        // Past both ends of the range where exp overflows or the result saturates.
        let tails = Tensor::<2>::from_data(
            TensorData::new(
                vec![-120.0f32, -88.0, -20.0, -0.0, 0.0, 20.0, 88.0, 120.0],
                [2, 4],
            ),
            &dev,
        );
        for x in [
            tails,
            Tensor::<2>::random([300, 70], Distribution::Normal(0.0, 6.0), &dev),
        ] {
            let up = Tensor::<2>::random(x.dims(), Distribution::Normal(0.0, 1.0), &dev);
            let (a, b) = (x.clone().require_grad(), x.require_grad());
            let ours = sigmoid(a.clone());
            let theirs = burn::tensor::activation::sigmoid(b.clone());
            ours.clone()
                .into_data()
                .assert_approx_eq::<f32>(&theirs.clone().into_data(), exact);
            let ga = (ours * up.clone()).sum().backward();
            let gb = (theirs * up).sum().backward();
            a.grad(&ga)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(&b.grad(&gb).unwrap().into_data(), exact);
        }
    }
}
