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
    // A panic in a request handler ends that handler without an answer; containerd only
    // sees a deadline pass. Say what happened where it shows: containerd's log.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(%info, "panic in the shim");
        default_hook(info);
    }));
    set_backend_factory(backend);
    containerd_shim::asynchronous::run::<Service>(RUNTIME_ID, None).await;
}
