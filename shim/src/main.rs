//! containerd-shim-carapace-v2: started by containerd for runtime `io.containerd.carapace.v2`.
//! See README.md.

use std::sync::Arc;

use carapace_shim::backend::Backend;
use carapace_shim::runtime_backend::RuntimeBackend;
use carapace_shim::service::{RUNTIME_ID, Service, set_backend_factory};

fn backend() -> Result<Arc<dyn Backend>, String> {
    Ok(Arc::new(RuntimeBackend::from_env()?))
}

fn main() {
    carapace_footprint::one_malloc_arena();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-carapace-v2: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(serve());
}

async fn serve() {
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
