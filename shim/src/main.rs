//! containerd-shim-carapace-v2: started by containerd for runtime `io.containerd.carapace.v2`.
//! See README.md.

use std::sync::Arc;

use carapace_shim::backend::Backend;
use carapace_shim::runtime_backend::RuntimeBackend;
use carapace_shim::service::{RUNTIME_ID, Service, set_backend_factory};

fn backend() -> Result<Arc<dyn Backend>, String> {
    Ok(Arc::new(RuntimeBackend::from_env()?))
}

#[tokio::main]
async fn main() {
    set_backend_factory(backend);
    containerd_shim::asynchronous::run::<Service>(RUNTIME_ID, None).await;
}
