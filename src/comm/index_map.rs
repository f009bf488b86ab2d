//! Which global coordinates a worker's local tensor holds, and moving values between global and local
//! coordinates (gather to build a subnetwork, scatter to average). docs/design.md §2.

use candle_core::{Result, Tensor};

/// Which global coordinates a local tensor holds: per axis, all of them (`None`) or the listed indices.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexMap {
    pub global_shape: Vec<usize>,
    pub axes: Vec<Option<Vec<u32>>>,
}

impl IndexMap {
    /// The whole tensor.
    pub fn full(shape: &[usize]) -> Self {
        Self { global_shape: shape.to_vec(), axes: vec![None; shape.len()] }
    }

    /// The whole tensor except axis `axis`, of which only `indices` (sorted) are held.
    pub fn narrowed(shape: &[usize], axis: usize, indices: &[usize]) -> Self {
        let mut m = Self::full(shape);
        if indices.len() != shape[axis] {
            m.axes[axis] = Some(indices.iter().map(|&i| i as u32).collect());
        }
        m
    }

    pub fn local_shape(&self) -> Vec<usize> {
        self.global_shape.iter().zip(&self.axes).map(|(&g, a)| a.as_ref().map_or(g, |ix| ix.len())).collect()
    }

    /// Number of scalars held.
    pub fn local_len(&self) -> usize {
        self.local_shape().iter().product()
    }

    pub fn is_full(&self) -> bool {
        self.axes.iter().all(|a| a.is_none())
    }

    /// The row-major flat index in the global tensor of every local element, in local row-major order.
    pub fn global_flat_indices(&self) -> Vec<usize> {
        let mut out = vec![0usize];
        for (axis, &g) in self.global_shape.iter().enumerate() {
            let held: Vec<usize> = match &self.axes[axis] {
                Some(ix) => ix.iter().map(|&i| i as usize).collect(),
                None => (0..g).collect(),
            };
            out = out.iter().flat_map(|&base| held.iter().map(move |&i| base * g + i)).collect();
        }
        out
    }

    /// The local tensor: `global` restricted to the held coordinates.
    pub fn gather(&self, global: &Tensor) -> Result<Tensor> {
        let mut t = global.clone();
        for (axis, ix) in self.axes.iter().enumerate() {
            if let Some(ix) = ix {
                let idx = Tensor::from_slice(ix, ix.len(), global.device())?;
                t = t.index_select(&idx, axis)?;
            }
        }
        if self.is_full() {
            t.copy()
        } else {
            Ok(t)
        }
    }

    /// `acc + scatter(local)` in one op where the map restricts at most one axis (every map the models
    /// build: a block is held whole or not at all, a neuron unit narrows one axis of each tensor).
    pub fn scatter_add(&self, acc: &Tensor, local: &Tensor) -> Result<Tensor> {
        let restricted: Vec<(usize, &Vec<u32>)> =
            self.axes.iter().enumerate().filter_map(|(a, ix)| ix.as_ref().map(|ix| (a, ix))).collect();
        match restricted.as_slice() {
            [] => acc + local,
            [(axis, ix)] => {
                let idx = Tensor::from_slice(ix, ix.len(), local.device())?;
                acc.index_add(&idx, local, *axis)
            }
            _ => acc + self.scatter(local)?,
        }
    }

    /// A global-shaped tensor holding `local` at its coordinates and zeros elsewhere.
    pub fn scatter(&self, local: &Tensor) -> Result<Tensor> {
        let mut t = local.clone();
        let mut shape = self.local_shape();
        // Expand one restricted axis at a time, innermost-first order does not matter.
        for (axis, ix) in self.axes.iter().enumerate() {
            if let Some(ix) = ix {
                shape[axis] = self.global_shape[axis];
                let idx = Tensor::from_slice(ix, ix.len(), local.device())?;
                t = Tensor::zeros(shape.as_slice(), local.dtype(), local.device())?.index_add(&idx, &t, axis)?;
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn scatter_add_equals_adding_the_scatter() -> Result<()> {
        let acc = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((2, 3, 4))?;
        let mut two = IndexMap::narrowed(&[2, 3, 4], 1, &[0, 2]);
        two.axes[2] = Some(vec![1, 3]);
        for m in [IndexMap::full(&[2, 3, 4]), IndexMap::narrowed(&[2, 3, 4], 2, &[0, 3]), two] {
            let local = (Tensor::ones(m.local_shape().as_slice(), DType::F32, &Device::Cpu)? * 10.0)?;
            let want = (&acc + m.scatter(&local)?)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(m.scatter_add(&acc, &local)?.flatten_all()?.to_vec1::<f32>()?, want, "{m:?}");
        }
        Ok(())
    }

    #[test]
    fn flat_indices_follow_the_gather() -> Result<()> {
        let g = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((2, 3, 4))?;
        let mut m = IndexMap::narrowed(&[2, 3, 4], 1, &[0, 2]);
        m.axes[2] = Some(vec![1, 3]);
        let want: Vec<f32> = m.gather(&g)?.flatten_all()?.to_vec1()?;
        let got: Vec<f32> = m.global_flat_indices().into_iter().map(|i| i as f32).collect();
        assert_eq!(got, want);
        assert_eq!(IndexMap::full(&[3]).global_flat_indices(), vec![0, 1, 2]);
        Ok(())
    }

    #[test]
    fn gather_then_scatter_roundtrips_on_held_coordinates() -> Result<()> {
        let g = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((2, 3, 4))?;
        let m = IndexMap::narrowed(&[2, 3, 4], 1, &[0, 2]);
        let l = m.gather(&g)?;
        assert_eq!(l.dims(), &[2, 2, 4]);
        assert_eq!(l.to_vec3::<f32>()?[1][1], vec![20.0, 21.0, 22.0, 23.0]);
        let s = m.scatter(&l)?;
        let v = s.to_vec3::<f32>()?;
        assert_eq!(v[0][1], vec![0.0; 4]);
        assert_eq!(v[1][2], vec![20.0, 21.0, 22.0, 23.0]);
        Ok(())
    }
}
