//! `alloc`: lease a subnet and nothing else (an external system does the data plane).

use async_trait::async_trait;

use super::{Backend, BackendContext, BackendError, Network};
use crate::lease::Lease;

/// The alloc backend.
pub struct AllocBackend;

impl AllocBackend {
    /// Registry constructor.
    pub fn create(_ctx: &BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(AllocBackend))
    }
}

struct AllocNetwork {
    lease: Lease,
    mtu: u32,
}

#[async_trait]
impl Backend for AllocBackend {
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError> {
        let lease = ctx.acquire_public_only_lease().await?;
        Ok(Box::new(AllocNetwork {
            lease,
            mtu: ctx.ext.mtu,
        }))
    }
}

#[async_trait]
impl Network for AllocNetwork {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }
}
