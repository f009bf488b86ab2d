//! Parameter storage and the layers every model is built from.
//!
//! Trainable parameters and buffers (BatchNorm running statistics) live in two separate maps keyed by their
//! PyTorch `state_dict` names and always iterated in name order (collectives and checkpoints need one order
//! on every rank). Layers hold clones of the same `Var`s, so the maps and the layers see one set of values.

use crate::ops::Epilogue;
use crate::seed::{name_hash, rng, Stream};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;
use std::collections::BTreeMap;

/// A model's parameters and buffers, by name.
#[derive(Clone, Default)]
pub struct ParamStore {
    pub params: BTreeMap<String, Var>,
    pub buffers: BTreeMap<String, Var>,
}

impl ParamStore {
    /// Number of scalar parameters (buffers excluded).
    pub fn num_params(&self) -> usize {
        self.params.values().map(|v| v.elem_count()).sum()
    }

    /// Current parameter values, detached, by name.
    pub fn param_tensors(&self) -> BTreeMap<String, Tensor> {
        self.params.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect()
    }

    /// Current values of every parameter and buffer, detached, by name.
    pub fn values(&self) -> BTreeMap<String, Tensor> {
        self.params.iter().chain(&self.buffers).map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect()
    }

    /// Current buffer values, detached (copied: buffers are updated in place by training forwards).
    pub fn buffer_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        self.buffers.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?))).collect()
    }

    /// Sets buffers from `values` (names must match).
    pub fn set_buffers(&self, values: &BTreeMap<String, Tensor>) -> Result<()> {
        for (k, v) in &self.buffers {
            if let Some(t) = values.get(k) {
                v.set(t)?;
            }
        }
        Ok(())
    }
}

/// How a fresh parameter is initialised.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// U(-1/√fan_in, 1/√fan_in): PyTorch's default for conv and linear weights and linear biases
    /// (kaiming_uniform with a = √5).
    Uniform {
        fan_in: usize,
    },
    /// Truncated-normal-free N(0, std²) (Swin's linear layers use trunc_normal(std=0.02)).
    Normal {
        std: f32,
    },
    Const(f32),
}

/// Creates parameters: drawn from the seeded `init` stream (one sub-stream per parameter name, so values do
/// not depend on construction order), or taken from given tensors (building a model from a checkpoint or a
/// subnetwork from gathered global values).
pub struct Builder<'a> {
    pub store: ParamStore,
    device: Device,
    source: Source<'a>,
    compute: DType,
}

enum Source<'a> {
    Seed(u64),
    Tensors(&'a BTreeMap<String, Tensor>),
}

impl<'a> Builder<'a> {
    pub fn from_seed(seed: u64, device: &Device) -> Self {
        Self { store: ParamStore::default(), device: device.clone(), source: Source::Seed(seed), compute: DType::F32 }
    }

    pub fn from_tensors(values: &'a BTreeMap<String, Tensor>, device: &Device) -> Self {
        Self {
            store: ParamStore::default(),
            device: device.clone(),
            source: Source::Tensors(values),
            compute: DType::F32,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the built model computes its activations in (parameters stay f32: layers cast them
    /// to the input's dtype in the forward pass, so gradients reach the f32 masters).
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute = dtype;
        self
    }

    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    fn value(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        match &self.source {
            Source::Tensors(map) => {
                let t =
                    map.get(name).ok_or_else(|| candle_core::Error::Msg(format!("no value for parameter `{name}`")))?;
                if t.dims() != shape {
                    candle_core::bail!("parameter `{name}` has shape {:?}, expected {shape:?}", t.dims());
                }
                t.to_dtype(DType::F32)?.to_device(&self.device)?.copy()
            }
            Source::Seed(seed) => {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = match init {
                    Init::Const(c) => vec![c; n],
                    Init::Uniform { fan_in } => {
                        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                        let mut r = rng(*seed, Stream::Init, name_hash(name), 0);
                        (0..n).map(|_| r.random_range(-bound..bound)).collect()
                    }
                    Init::Normal { std } => {
                        use rand_distr::{Distribution, Normal};
                        let mut r = rng(*seed, Stream::Init, name_hash(name), 0);
                        let d = Normal::new(0.0, std).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                        (0..n).map(|_| d.sample(&mut r).clamp(-2.0 * std, 2.0 * std)).collect()
                    }
                };
                // Drawn on the CPU, then moved: candle's device RNGs cannot be seeded.
                Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(&self.device)
            }
        }
    }

    /// A trainable parameter.
    pub fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        let var = Var::from_tensor(&self.value(name, shape, init)?)?;
        self.store.params.insert(name.to_string(), var.clone());
        Ok(var)
    }

    /// A buffer (not trained): BatchNorm running statistics. Missing from a tensor source → `fill`.
    pub fn buffer(&mut self, name: &str, shape: &[usize], fill: f32) -> Result<Var> {
        let t = match &self.source {
            Source::Tensors(map) if map.contains_key(name) => self.value(name, shape, Init::Const(fill))?,
            _ => Tensor::full(fill, shape, &self.device)?,
        };
        let var = Var::from_tensor(&t)?;
        self.store.buffers.insert(name.to_string(), var.clone());
        Ok(var)
    }
}

/// A parameter in the dtype of the activations it meets (a differentiable cast, so the gradient
/// reaches the f32 master; free when the dtypes already agree).
fn as_dtype_of(param: &Tensor, xs: &Tensor) -> Result<Tensor> {
    if param.dtype() == xs.dtype() {
        Ok(param.clone())
    } else {
        param.to_dtype(xs.dtype())
    }
}

/// 2-D convolution without bias.
pub struct Conv2d {
    pub weight: Var,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    pub fn new(
        b: &mut Builder,
        name: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight =
            b.param(&format!("{name}.weight"), &[c_out, c_in, k, k], Init::Uniform { fan_in: c_in * k * k })?;
        Ok(Self { weight, stride, padding })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        crate::ops::conv2d(xs, &as_dtype_of(self.weight.as_tensor(), xs)?, self.stride, self.padding)
    }
}

/// Fully connected layer `y = x Wᵀ + b`.
pub struct Linear {
    pub weight: Var,
    pub bias: Option<Var>,
}

impl Linear {
    pub fn new(b: &mut Builder, name: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let weight = b.param(&format!("{name}.weight"), &[d_out, d_in], Init::Uniform { fan_in: d_in })?;
        let bias =
            if bias { Some(b.param(&format!("{name}.bias"), &[d_out], Init::Uniform { fan_in: d_in })?) } else { None };
        Ok(Self { weight, bias })
    }

    /// Like [`Linear::new`] with N(0, 0.02²) weights and zero bias (timm's Swin init).
    pub fn new_trunc_normal(b: &mut Builder, name: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let weight = b.param(&format!("{name}.weight"), &[d_out, d_in], Init::Normal { std: 0.02 })?;
        let bias = if bias { Some(b.param(&format!("{name}.bias"), &[d_out], Init::Const(0.0))?) } else { None };
        Ok(Self { weight, bias })
    }

    /// `xs` is (…, d_in).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let w = as_dtype_of(self.weight.as_tensor(), xs)?;
        let ys = match xs.rank() {
            2 => xs.matmul(&w.t()?)?,
            _ => xs.broadcast_matmul(&w.t()?)?,
        };
        match &self.bias {
            Some(b) => ys.broadcast_add(&as_dtype_of(b.as_tensor(), xs)?),
            None => Ok(ys),
        }
    }
}

/// BatchNorm over channels of (B, C, H, W) or (B, C), with PyTorch's running-statistics rule
/// (momentum 0.1, unbiased variance in the running estimate). `None` norm makes it the identity.
pub struct BatchNorm {
    inner: Option<BnParams>,
}

struct BnParams {
    weight: Var,
    bias: Var,
    running_mean: Var,
    running_var: Var,
}

pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

impl BatchNorm {
    pub fn new(b: &mut Builder, name: &str, c: usize, enabled: bool) -> Result<Self> {
        if !enabled {
            return Ok(Self { inner: None });
        }
        Ok(Self {
            inner: Some(BnParams {
                weight: b.param(&format!("{name}.weight"), &[c], Init::Const(1.0))?,
                bias: b.param(&format!("{name}.bias"), &[c], Init::Const(0.0))?,
                running_mean: b.buffer(&format!("{name}.running_mean"), &[c], 0.0)?,
                running_var: b.buffer(&format!("{name}.running_var"), &[c], 1.0)?,
            }),
        })
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_fused(xs, train, &Epilogue::default())
    }

    /// `act(scale * bn(xs) + residual)` as one op (see [`crate::ops::batch_norm_train_fused`]);
    /// without normalisation, the epilogue applied to `xs`.
    pub fn forward_fused(&self, xs: &Tensor, train: bool, epi: &Epilogue) -> Result<Tensor> {
        let Some(p) = &self.inner else { return epi.apply(xs.clone()) };
        if train {
            let (ys, mean, var) =
                crate::ops::batch_norm_train_fused(xs, p.weight.as_tensor(), p.bias.as_tensor(), BN_EPS, epi)?;
            let n = (xs.elem_count() / xs.dim(1)?) as f64;
            let unbiased = (var * (n / (n - 1.0).max(1.0)))?;
            let m = BN_MOMENTUM;
            p.running_mean.set(&((p.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?)?;
            p.running_var.set(&((p.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?)?;
            Ok(ys)
        } else {
            crate::ops::batch_norm_eval(
                xs,
                p.weight.as_tensor(),
                p.bias.as_tensor(),
                p.running_mean.as_tensor(),
                p.running_var.as_tensor(),
                BN_EPS,
                epi,
            )
        }
    }
}
