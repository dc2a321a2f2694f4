//! `x W + b` for burn's Flex backend, forward and backward, with outputs written once.
//!
//! burn's Linear on Flex is a matmul whose result burn-flex zero-fills and then copies into a
//! fresh tensor, followed by a broadcast bias addition; its backward pass runs two more
//! matmuls of that kind and sums the gradient over the rows. All of those passes but the
//! GEMMs run on the calling thread while the other cores wait, and the GNN's Linears act on
//! every edge of the graph (`E x d` and `E x 4d`). Here the GEMMs write straight into the
//! output buffer ([`super::gemm`]), and the bias is added, and its gradient summed, on every
//! core.
//!
//! The values are burn's: the products are the same `gemm` calls on the same operands (a
//! transposed weight is passed by its strides, as burn-flex passes it), the bias is added to
//! the rounded product, and only the bias gradient's summation differs (f64 partial sums in
//! a fixed order, independent of the threads).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::nn::Linear;
use burn::tensor::{DType, Shape, Tensor};
use rayon::prelude::*;

use super::autodiff::{backward, record};
use super::gemm::{Mat, Product, product, product_pair};
use super::{contiguous, from_vec_shaped, is_flex, rows_per_task, sum_in_order};

/// `linear.forward(x)`: our kernel on the CPU in f32, burn's Linear elsewhere.
///
/// # Shapes
/// - `x`: `[..., d_in]`
/// - output: `[..., d_out]`
pub fn linear<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    if !applies(&x) {
        return linear.forward(x);
    }
    let weight = linear.weight.val();
    per_row(x, weight.dims()[1], |x| match &linear.bias {
        Some(bias) => <Dispatch as LinearBackend>::dense_linear(
            x.into_dispatch(),
            weight.into_dispatch(),
            bias.val().into_dispatch(),
        ),
        None => {
            <Dispatch as LinearBackend>::dense_matmul(x.into_dispatch(), weight.into_dispatch())
        }
    })
}

/// `x W` for a weight `[d_in, d_out]`, as [`linear`] computes it without a bias.
///
/// # Shapes
/// - `x`: `[..., d_in]`
/// - `weight`: `[d_in, d_out]`
/// - output: `[..., d_out]`
pub fn matmul_weight<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    if !applies(&x) {
        return x.matmul(weight.unsqueeze());
    }
    per_row(x, weight.dims()[1], |x| {
        <Dispatch as LinearBackend>::dense_matmul(x.into_dispatch(), weight.into_dispatch())
    })
}

/// Whether the kernel runs for `x`: f32 on the Flex backend, rank 2 or more.
fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    D >= 2 && x.dtype() == DType::F32 && is_flex(&x.device())
}

/// `f` on `x` seen as rows `[rows, d_in]`, its `[rows, d_out]` result given `x`'s leading
/// dimensions back.
fn per_row<const D: usize>(
    x: Tensor<D>,
    d_out: usize,
    f: impl FnOnce(Tensor<2>) -> FloatTensor<Dispatch>,
) -> Tensor<D> {
    let dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product();
    let out: Tensor<2> = Tensor::from_dispatch(f(x.reshape([rows, d_in])));
    let mut out_dims = dims;
    out_dims[D - 1] = d_out;
    out.reshape(out_dims)
}

/// The Linear as a backend extension, so that autodiff records our backward kernel.
#[backend_extension(Flex, Autodiff)]
pub trait LinearBackend: Backend {
    /// `x [M, K] x weight [K, N]`.
    fn dense_matmul(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x [M, K] x weight [K, N] + bias [N]`, the bias added to every row.
    fn dense_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// The gradients of `x`, `weight` and the bias from the output's, each only when asked
    /// for (`needs = [x, weight, bias]`); not differentiable.
    #[allow(clippy::type_complexity)]
    fn dense_linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        needs: [bool; 3],
    ) -> (
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
    );
}

/// `t` as a GEMM operand: itself when it is a rank-2 view with non-negative strides, else a
/// contiguous copy.
fn operand(t: FlexTensor) -> FlexTensor {
    if Mat::of(&t).is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// `[rows, cols]` of a rank-2 tensor.
fn dims2(t: &FlexTensor) -> [usize; 2] {
    let shape = t.shape();
    [shape[0], shape[1]]
}

fn mat(t: &FlexTensor) -> Mat<'_> {
    Mat::of(t).expect("a rank-2 operand with non-negative strides (see `operand`)")
}

/// `x W`, `[M, N]`.
fn forward(x: &FlexTensor, weight: &FlexTensor) -> Vec<f32> {
    let ([m, k], [_, n]) = (dims2(x), dims2(weight));
    product(m, n, k, mat(x), mat(weight))
}

/// Per column `j`, `sum_i g[i, j]` of a contiguous `[rows, n]` matrix: f64 partial sums per
/// block of rows, added in block order (so the result does not depend on the threads).
fn column_sums(gs: &[f32], n: usize) -> Vec<f32> {
    let width = n.max(1);
    let parts = gs
        .par_chunks(rows_per_task(width) * width)
        .map(|rows| {
            let mut sums = vec![0.0f64; n];
            for row in rows.chunks_exact(width) {
                for (s, &g) in sums.iter_mut().zip(row) {
                    *s += f64::from(g);
                }
            }
            sums
        })
        .collect::<Vec<_>>();
    sum_in_order(parts, n)
        .into_iter()
        .map(|s| s as f32)
        .collect()
}

impl LinearBackend for Flex {
    fn dense_matmul(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
        let (x, weight) = (operand(x), operand(weight));
        let out = forward(&x, &weight);
        from_vec_shaped(out, Shape::new([dims2(&x)[0], dims2(&weight)[1]]))
    }

    fn dense_linear(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let (x, weight, bias) = (operand(x), operand(weight), contiguous(bias));
        let b = bias.as_slice::<f32>().expect("contiguous f32");
        let mut out = forward(&x, &weight);
        let width = b.len().max(1);
        out.par_chunks_mut(rows_per_task(width) * width)
            .for_each(|rows| {
                for row in rows.chunks_exact_mut(width) {
                    row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                }
            });
        from_vec_shaped(out, Shape::new([dims2(&x)[0], b.len()]))
    }

    fn dense_linear_backward(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        [need_x, need_w, need_b]: [bool; 3],
    ) -> (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>) {
        let (x, weight, grad) = (operand(x), operand(weight), contiguous(grad));
        let ([m, k], [_, n]) = (dims2(&x), dims2(&weight));
        let gs = grad.as_slice::<f32>().expect("contiguous f32");
        let g = Mat::rows(gs, n);
        // dx = g W^T: [M, N] x [N, K].
        let dx_product = || Product {
            m,
            n: k,
            k: n,
            a: g,
            b: mat(&weight).t(),
        };
        // dW = x^T g: [K, M] x [M, N].
        let dw_product = || Product {
            m: k,
            n,
            k: m,
            a: mat(&x).t(),
            b: g,
        };
        let whole = |p: Product| product(p.m, p.n, p.k, p.a, p.b);
        let (dx, dw) = match (need_x, need_w) {
            (true, true) => {
                let (dx, dw) = product_pair(dx_product(), dw_product());
                (Some(dx), Some(dw))
            }
            _ => (
                need_x.then(|| whole(dx_product())),
                need_w.then(|| whole(dw_product())),
            ),
        };
        let dx = dx.map(|dx| from_vec_shaped(dx, Shape::new([m, k])));
        let dw = dw.map(|dw| from_vec_shaped(dw, Shape::new([k, n])));
        let db = need_b.then(|| from_vec_shaped(column_sums(gs, n), Shape::new([n])));
        (dx, dw, db)
    }
}

impl<B: LinearBackend, C: CheckpointStrategy> LinearBackend for Autodiff<B, C> {
    fn dense_matmul(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct MatmulGrad;

        impl<B: LinearBackend> Backward<B, 2> for MatmulGrad {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                backward::<B, _, 2>(ops, grads, |(x, weight), grad, [nx, nw]| {
                    let (dx, dw, _) = B::dense_linear_backward(x, weight, grad, [nx, nw, false]);
                    [dx, dw]
                });
            }
        }

        record::<C, _, _, _>(
            MatmulGrad,
            [x, weight],
            |[x, weight]| B::dense_matmul(x, weight),
            |[x, weight], _| (x, weight),
        )
    }

    fn dense_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LinearGrad;

        impl<B: LinearBackend> Backward<B, 3> for LinearGrad {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                backward::<B, _, 3>(ops, grads, |(x, weight), grad, needs| {
                    let (dx, dw, db) = B::dense_linear_backward(x, weight, grad, needs);
                    [dx, dw, db]
                });
            }
        }

        record::<C, _, _, _>(
            LinearGrad,
            [x, weight, bias],
            |[x, weight, bias]| B::dense_linear(x, weight, bias),
            |[x, weight, _], _| (x, weight),
        )
    }

    #[allow(clippy::type_complexity)]
    fn dense_linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        needs: [bool; 3],
    ) -> (
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
    ) {
        let (dx, dw, db) = B::dense_linear_backward(
            x.into_primitive(),
            weight.into_primitive(),
            grad.into_primitive(),
            needs,
        );
        (
            dx.map(FloatTensor::<Self>::new),
            dw.map(FloatTensor::<Self>::new),
            db.map(FloatTensor::<Self>::new),
        )
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::nn::LinearConfig;
    use burn::tensor::{Device, Distribution, Tolerance};

    use super::*;

    /// Two Linears with the same values, `weight` given as `[d_in, d_out]` (a view or not).
    fn twins(weight: &Tensor<2>, bias: Option<&Tensor<1>>, dev: &Device) -> [Linear; 2] {
        let [d_in, d_out] = weight.dims();
        std::array::from_fn(|_| {
            let mut linear = LinearConfig::new(d_in, d_out).init(dev);
            linear.weight = Param::from_tensor(weight.clone());
            linear.bias = bias.map(|b| Param::from_tensor(b.clone()));
            linear
        })
    }

    #[test]
    fn matches_burns_linear_on_values_and_every_gradient() {
        let dev = Device::flex().autodiff();
        let exact = Tolerance::<f32>::rel_abs(0.0, 0.0);
        for (rows, d_in, d_out, with_bias, transposed_weight) in [
            (300, 24, 40, true, false),
            (3, 5, 2048, true, false),
            (1, 1, 1, true, false),
            (257, 64, 33, false, false),
            // A weight stored as PyTorch's `[out, in]` and viewed transposed.
            (97, 48, 72, true, true),
            (0, 4, 3, true, false),
        ] {
            let weight = if transposed_weight {
                Tensor::<2>::random([d_out, d_in], Distribution::Normal(0.0, 1.0), &dev).transpose()
            } else {
                Tensor::<2>::random([d_in, d_out], Distribution::Normal(0.0, 1.0), &dev)
            };
            let bias = Tensor::<1>::random([d_out], Distribution::Normal(0.0, 2.0), &dev);
            let [ours_l, theirs_l] = twins(&weight, with_bias.then_some(&bias), &dev);
            let x = Tensor::<2>::random([rows, d_in], Distribution::Normal(0.0, 3.0), &dev);
            let up = Tensor::<2>::random([rows, d_out], Distribution::Normal(0.0, 1.0), &dev);
            let (a, b) = (x.clone().require_grad(), x.require_grad());
            let ours = linear(&ours_l, a.clone());
            let theirs = theirs_l.forward(b.clone());
            // The same GEMM on the same operands, then the same f32 addition: equal bits.
            ours.clone()
                .into_data()
                .assert_approx_eq::<f32>(&theirs.clone().into_data(), exact);
            let ga = (ours * up.clone()).sum().backward();
            let gb = (theirs * up).sum().backward();
            a.grad(&ga)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(&b.grad(&gb).unwrap().into_data(), exact);
            let weight_grad = |l: &Linear, g| l.weight.grad(g).unwrap().into_data();
            weight_grad(&ours_l, &ga).assert_approx_eq::<f32>(&weight_grad(&theirs_l, &gb), exact);
            if with_bias {
                // Summed in f64 here and in f32 by burn.
                let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-5);
                let grad = |l: &Linear, g| l.bias.as_ref().unwrap().grad(g).unwrap().into_data();
                grad(&ours_l, &ga).assert_approx_eq::<f32>(&grad(&theirs_l, &gb), tol);
            }
        }
    }

    #[test]
    fn leading_dimensions_and_views_of_the_input_keep_their_shape() {
        let dev = Device::flex();
        let weight = Tensor::<2>::random([6, 7], Distribution::Normal(0.0, 1.0), &dev);
        let bias = Tensor::<1>::random([7], Distribution::Normal(0.0, 1.0), &dev);
        let [l, _] = twins(&weight, Some(&bias), &dev);
        let exact = Tolerance::<f32>::rel_abs(0.0, 0.0);
        let x = Tensor::<3>::random([2, 3, 6], Distribution::Normal(0.0, 2.0), &dev);
        let ours = linear(&l, x.clone());
        assert_eq!(ours.dims(), [2, 3, 7]);
        ours.into_data()
            .assert_approx_eq::<f32>(&l.forward(x).into_data(), exact);
        // A transposed view of the input is read through its strides.
        let xt = Tensor::<2>::random([6, 5], Distribution::Normal(0.0, 2.0), &dev).transpose();
        linear(&l, xt.clone())
            .into_data()
            .assert_approx_eq::<f32>(&l.forward(xt.clone()).into_data(), exact);
        matmul_weight(xt.clone(), weight.clone())
            .into_data()
            .assert_approx_eq::<f32>(&xt.matmul(weight).into_data(), exact);
    }

    #[test]
    fn bias_gradients_are_f64_sums_that_do_not_depend_on_the_threads() {
        let n = 7;
        let g: Vec<f32> = (0..70_000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let want: Vec<f32> = (0..n)
            .map(|j| {
                g.iter()
                    .skip(j)
                    .step_by(n)
                    .map(|&v| f64::from(v))
                    .sum::<f64>() as f32
            })
            .collect();
        let pools = [1, 3].map(|t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        });
        let [one, three] = pools.map(|p| p.install(|| column_sums(&g, n)));
        assert_eq!(one, three);
        for (a, b) in one.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{one:?} vs {want:?}"
            );
        }
    }
}
