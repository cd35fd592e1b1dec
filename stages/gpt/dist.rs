//! Data parallelism: where this process stands in a training world, and the one collective the
//! trainer needs — averaging gradients over ranks.
//!
//! A world is `machines × processes per machine`. The launcher (torchrun, Slurm, or nothing)
//! starts one nanoflow per machine; that nanoflow's train stage spawns one worker process per
//! GPU (`gpus`), as torchrun would, and each worker is one rank. Ranks meet at the master's
//! address: rank 0 listens there and the others connect, so every rank holds a socket to rank 0
//! for the life of the run. Over those sockets ranks exchange NCCL's unique id (CUDA) or the
//! gradients themselves (CPU, where this is the whole collective: CI proves the fan-out with
//! it). A rank that dies closes its socket, so the others fail at their next collective instead
//! of hanging.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// This process's place in the world.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct World {
    /// 0..size; rank 0 prints the log.
    pub rank: usize,
    pub size: usize,
    /// The rank among those on this machine: its GPU, and 0 writes the machine's outputs.
    pub local_rank: usize,
    /// `host:port` where rank 0 listens.
    pub master: String,
}

impl World {
    pub fn single() -> World {
        World { rank: 0, size: 1, local_rank: 0, master: String::new() }
    }

    /// Rank 0 alone logs.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Local rank 0 writes checkpoints and metrics into this machine's store; rank 0 alone
    /// when the machines share one output directory ([`SHARED_OUT`]).
    pub fn writes_outputs(&self) -> bool {
        self.local_rank == 0 && (self.rank == 0 || std::env::var_os(SHARED_OUT).is_none())
    }
}

/// Set in a Slurm job of nanoflow's executor: the job's tasks write into one output directory
/// on a shared filesystem (rank 0 alone writes), and a node may run several tasks, each a
/// "machine" of its own (CPU ranks, or GPUs Slurm gave each task).
pub const SHARED_OUT: &str = "NANOFLOW_SHARED_OUT";

/// The machines a launcher started, one nanoflow on each: read from the variables torchrun and
/// Slurm set (one task per machine: `torchrun --nproc-per-node=1`, `srun --ntasks-per-node=1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machines {
    pub rank: usize,
    pub count: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// torchrun's default rendezvous port.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl Machines {
    /// One machine, no launcher.
    pub fn single() -> Machines {
        Machines { rank: 0, count: 1, master_addr: "127.0.0.1".into(), master_port: 0 }
    }

    /// torchrun's `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`MASTER_ADDR`/`MASTER_PORT`, else Slurm's
    /// `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`/`SLURM_JOB_NODELIST` (the master is the
    /// job's first node, the port `MASTER_PORT` or 29500), else one machine.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Machines> {
        let number = |name: &str| -> anyhow::Result<Option<usize>> {
            var(name)
                .map(|value| value.trim().parse().with_context(|| format!("`{name}={value}` is not a number")))
                .transpose()
        };
        let port = || -> anyhow::Result<u16> {
            match var("MASTER_PORT") {
                Some(value) => value.trim().parse().with_context(|| format!("`MASTER_PORT={value}` is not a port")),
                None => Ok(DEFAULT_MASTER_PORT),
            }
        };
        let (rank, count, local, master_addr, launcher) = if let Some(count) = number("WORLD_SIZE")? {
            let rank = number("RANK")?.context("`WORLD_SIZE` is set but `RANK` is not")?;
            let addr = var("MASTER_ADDR").context("`WORLD_SIZE` is set but `MASTER_ADDR` is not")?;
            (rank, count, number("LOCAL_RANK")?.unwrap_or(0), addr, "torchrun --nproc-per-node=1")
        } else if let Some(count) = number("SLURM_NTASKS")? {
            let rank = number("SLURM_PROCID")?.context("`SLURM_NTASKS` is set but `SLURM_PROCID` is not")?;
            let nodes = var("SLURM_JOB_NODELIST").context("`SLURM_NTASKS` is set but `SLURM_JOB_NODELIST` is not")?;
            let addr = match var("MASTER_ADDR") {
                Some(addr) => addr,
                None => first_host(&nodes)?,
            };
            (rank, count, number("SLURM_LOCALID")?.unwrap_or(0), addr, "srun --ntasks-per-node=1")
        } else {
            return Ok(Machines::single());
        };
        ensure!(count > 0 && rank < count, "rank {rank} is outside a world of {count} machines");
        ensure!(
            local == 0 || var(SHARED_OUT).is_some(),
            "this is local rank {local}: start one nanoflow per machine (`{launcher}`); its train stages spawn one \
             worker per GPU themselves (`gpus`)"
        );
        if count == 1 {
            return Ok(Machines::single());
        }
        Ok(Machines { rank, count, master_addr, master_port: port()? })
    }
}

/// The first host of a Slurm node list: `gpu[01-04,07],cpu1` -> `gpu01`.
pub fn first_host(list: &str) -> anyhow::Result<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if list[end..].starts_with('[') {
        let inner = &list[end + 1..];
        let first = inner.split([',', '-', ']']).next().unwrap_or("");
        ensure!(!first.is_empty(), "cannot read the node list `{list}`");
        return Ok(format!("{prefix}{first}"));
    }
    ensure!(!prefix.is_empty(), "the node list `{list}` is empty");
    Ok(prefix.to_string())
}

/// Averages tensors over the ranks of a world. Every rank calls it with tensors of the same
/// shapes in the same order; all get the same result.
pub trait Collective {
    /// The elementwise mean over ranks of a flat f32 tensor.
    fn all_reduce_mean(&mut self, flat: &Tensor) -> anyhow::Result<Tensor>;
}

/// Elements per all-reduce call: gradients travel in buckets of about 100 MB rather than one
/// call per tensor (DDP's default is 25 MB; fewer, larger calls suit NCCL's ring as well).
const BUCKET: usize = 25 << 20;

/// Replaces each gradient by its mean over the ranks, in flattened buckets. `extra` (the
/// step's loss, say) rides along in the last bucket and comes back averaged too.
pub fn average(collective: &mut dyn Collective, grads: &mut [Tensor], extra: &Tensor) -> anyhow::Result<Tensor> {
    let mut start = 0;
    while start < grads.len() {
        let mut end = start;
        let mut len = 0;
        while end < grads.len() && (end == start || len + grads[end].elem_count() <= BUCKET) {
            len += grads[end].elem_count();
            end += 1;
        }
        let last = end == grads.len();
        let mut parts: Vec<Tensor> = grads[start..end]
            .iter()
            .map(|g| g.to_dtype(DType::F32)?.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        if last {
            parts.push(extra.to_dtype(DType::F32)?.flatten_all()?);
        }
        let flat = collective.all_reduce_mean(&Tensor::cat(&parts, 0)?)?;
        let mut offset = 0;
        for grad in &mut grads[start..end] {
            let n = grad.elem_count();
            *grad = flat.narrow(0, offset, n)?.reshape(grad.shape())?.to_dtype(grad.dtype())?;
            offset += n;
        }
        if last {
            return Ok(flat.narrow(0, offset, extra.elem_count())?.reshape(extra.shape())?);
        }
        start = end;
    }
    Ok(collective.all_reduce_mean(&extra.to_dtype(DType::F32)?.flatten_all()?)?.reshape(extra.shape())?)
}

/// How long ranks wait for each other to join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(600);
const HELLO: &[u8; 8] = b"nanoflw1";

/// The sockets between rank 0 and every other rank.
pub struct Rendezvous {
    world: World,
    /// Rank 0: the stream of rank r at r - 1. Others: the stream to rank 0.
    peers: Vec<TcpStream>,
}

impl Rendezvous {
    /// Rank 0 listens at `world.master`, the others connect (retrying while rank 0 starts).
    pub fn join(world: &World) -> anyhow::Result<Rendezvous> {
        let mut peers = Vec::new();
        if world.size == 1 {
            return Ok(Rendezvous { world: world.clone(), peers });
        }
        let deadline = Instant::now() + JOIN_TIMEOUT;
        if world.rank == 0 {
            let listener = TcpListener::bind(bind_address(&world.master)?)
                .with_context(|| format!("rank 0 could not listen at `{}`", world.master))?;
            listener.set_nonblocking(true)?;
            let mut joined: Vec<Option<TcpStream>> = (1..world.size).map(|_| None).collect();
            while joined.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut stream, from)) => {
                        stream.set_nonblocking(false)?;
                        let mut hello = [0u8; 24];
                        stream
                            .read_exact(&mut hello)
                            .with_context(|| format!("a rank from {from} did not say hello"))?;
                        let (rank, size) = (u64_at(&hello, 8) as usize, u64_at(&hello, 16) as usize);
                        ensure!(&hello[..8] == HELLO, "{from} is not a nanoflow rank");
                        ensure!(
                            size == world.size,
                            "rank {rank} at {from} thinks the world has {size} ranks, not {}",
                            world.size
                        );
                        ensure!((1..world.size).contains(&rank), "{from} claims rank {rank} of {}", world.size);
                        ensure!(joined[rank - 1].is_none(), "rank {rank} joined twice");
                        stream.set_nodelay(true)?;
                        joined[rank - 1] = Some(stream);
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<usize> =
                                (1..world.size).filter(|rank| joined[rank - 1].is_none()).collect();
                            bail!(
                                "ranks {missing:?} did not join rank 0 at `{}` within {JOIN_TIMEOUT:?}",
                                world.master
                            );
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(error) => return Err(error).context("rank 0 could not accept a rank"),
                }
            }
            peers = joined.into_iter().map(|stream| stream.expect("all joined")).collect();
        } else {
            let mut stream = loop {
                match TcpStream::connect(&world.master) {
                    Ok(stream) => break stream,
                    Err(error) if Instant::now() > deadline => {
                        return Err(error).with_context(|| {
                            format!("rank {} could not reach rank 0 at `{}`", world.rank, world.master)
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            let mut hello = HELLO.to_vec();
            hello.extend((world.rank as u64).to_le_bytes());
            hello.extend((world.size as u64).to_le_bytes());
            stream.write_all(&hello)?;
            stream.set_nodelay(true)?;
            peers.push(stream);
        }
        Ok(Rendezvous { world: world.clone(), peers })
    }

    /// Rank 0's `bytes` on every rank (the others pass a buffer of the same length to fill):
    /// NCCL's unique id.
    #[cfg(feature = "nccl")]
    pub fn broadcast(&mut self, bytes: &mut [u8]) -> anyhow::Result<()> {
        if self.world.rank == 0 {
            for (i, peer) in self.peers.iter_mut().enumerate() {
                peer.write_all(bytes).with_context(|| lost(i + 1))?;
            }
        } else {
            self.peers[0].read_exact(bytes).with_context(|| lost(0))?;
        }
        Ok(())
    }
}

fn lost(rank: usize) -> String {
    format!("lost rank {rank} (it exited or its machine is unreachable)")
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Rank 0 listens on every interface at the master's port when the master is a host name
/// other machines use; on loopback when it is loopback.
fn bind_address(master: &str) -> anyhow::Result<std::net::SocketAddr> {
    let addr = master
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve the master address `{master}`"))?
        .next()
        .with_context(|| format!("the master address `{master}` resolves to nothing"))?;
    Ok(if addr.ip().is_loopback() { addr } else { std::net::SocketAddr::new([0, 0, 0, 0].into(), addr.port()) })
}

/// The CPU collective: rank 0 sums the ranks' buffers in rank order (so every world size adds
/// in a fixed order) and sends the mean back.
pub struct TcpCollective {
    rendezvous: Rendezvous,
}

impl TcpCollective {
    pub fn new(rendezvous: Rendezvous) -> TcpCollective {
        TcpCollective { rendezvous }
    }
}

impl Collective for TcpCollective {
    fn all_reduce_mean(&mut self, flat: &Tensor) -> anyhow::Result<Tensor> {
        let world = self.rendezvous.world.clone();
        if world.size == 1 {
            return Ok(flat.clone());
        }
        let device = flat.device().clone();
        let mut values = flat.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let mut bytes = vec![0u8; values.len() * 4];
        if world.rank == 0 {
            let mut sum: Vec<f64> = values.iter().map(|&v| v as f64).collect();
            for (i, peer) in self.rendezvous.peers.iter_mut().enumerate() {
                peer.read_exact(&mut bytes).with_context(|| lost(i + 1))?;
                for (sum, chunk) in sum.iter_mut().zip(bytes.chunks_exact(4)) {
                    *sum += f32::from_le_bytes(chunk.try_into().expect("4 bytes")) as f64;
                }
            }
            for (value, sum) in values.iter_mut().zip(&sum) {
                *value = (sum / world.size as f64) as f32;
            }
            encode(&values, &mut bytes);
            for (i, peer) in self.rendezvous.peers.iter_mut().enumerate() {
                peer.write_all(&bytes).with_context(|| lost(i + 1))?;
            }
        } else {
            encode(&values, &mut bytes);
            let peer = &mut self.rendezvous.peers[0];
            peer.write_all(&bytes).with_context(|| lost(0))?;
            peer.read_exact(&mut bytes).with_context(|| lost(0))?;
            for (value, chunk) in values.iter_mut().zip(bytes.chunks_exact(4)) {
                *value = f32::from_le_bytes(chunk.try_into().expect("4 bytes"));
            }
        }
        Ok(Tensor::from_vec(values, flat.elem_count(), &device)?)
    }
}

fn encode(values: &[f32], bytes: &mut [u8]) {
    for (chunk, value) in bytes.chunks_exact_mut(4).zip(values) {
        chunk.copy_from_slice(&value.to_le_bytes());
    }
}

/// The collective for a world's device: NCCL on CUDA (with the `nccl` feature), the TCP one on
/// the CPU.
pub fn connect(world: &World, device: &Device) -> anyhow::Result<Box<dyn Collective>> {
    let rendezvous = Rendezvous::join(world)?;
    if device.is_cpu() {
        return Ok(Box::new(TcpCollective::new(rendezvous)));
    }
    #[cfg(feature = "nccl")]
    {
        return Ok(Box::new(nccl::NcclCollective::new(rendezvous, device)?));
    }
    #[allow(unreachable_code)]
    {
        ensure!(world.size == 1, "training on several GPUs needs nanoflow built with `--features nccl`");
        Ok(Box::new(TcpCollective::new(rendezvous)))
    }
}

#[cfg(feature = "nccl")]
mod nccl {
    //! NCCL through cudarc: rank 0 makes the unique id and sends it over the rendezvous; each
    //! rank then joins the communicator on its device's stream. Gradients are averaged in
    //! place of a copy on the GPU (`ncclAvg`), never leaving it.

    use anyhow::Context as _;
    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};
    use cudarc::nccl::safe::{Comm, Id, ReduceOp};

    use super::{Collective, Rendezvous};

    pub struct NcclCollective {
        /// Held open for the life of the run: the sockets to rank 0 are how a lost rank shows.
        _rendezvous: Rendezvous,
        comm: Comm,
    }

    impl NcclCollective {
        pub fn new(mut rendezvous: Rendezvous, device: &Device) -> anyhow::Result<NcclCollective> {
            let Device::Cuda(cuda) = device else { anyhow::bail!("NCCL needs a CUDA device") };
            let world = rendezvous.world.clone();
            let mut id = [0u8; 128];
            if world.rank == 0 {
                let made = Id::new().map_err(|error| anyhow::anyhow!("ncclGetUniqueId: {error:?}"))?;
                for (byte, c) in id.iter_mut().zip(made.internal()) {
                    *byte = *c as u8;
                }
            }
            rendezvous.broadcast(&mut id)?;
            let id = Id::uninit(id.map(|byte| byte as core::ffi::c_char));
            let comm = Comm::from_rank(cuda.cuda_stream(), world.rank, world.size, id).map_err(|error| {
                anyhow::anyhow!("ncclCommInitRank (rank {} of {}): {error:?}", world.rank, world.size)
            })?;
            Ok(NcclCollective { _rendezvous: rendezvous, comm })
        }
    }

    impl Collective for NcclCollective {
        fn all_reduce_mean(&mut self, flat: &Tensor) -> anyhow::Result<Tensor> {
            Ok(flat.contiguous()?.apply_op1_no_bwd(&AllReduce { comm: &self.comm })?)
        }
    }

    struct AllReduce<'a> {
        comm: &'a Comm,
    }

    impl CustomOp1 for AllReduce<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-mean"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("NCCL all-reduce of a CPU tensor")
        }

        fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let device = storage.device().clone();
            let src = storage.as_cuda_slice::<f32>()?;
            let (start, end) =
                layout.contiguous_offsets().context("a contiguous tensor").map_err(candle_core::Error::wrap)?;
            let src = src.slice(start..end);
            let mut dst = unsafe { device.alloc::<f32>(end - start)? };
            self.comm
                .all_reduce(&src, &mut dst, &ReduceOp::Avg)
                .map_err(|error| candle_core::Error::Msg(format!("ncclAllReduce: {error:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, device), layout.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn machines_come_from_torchrun_or_slurm() -> anyhow::Result<()> {
        assert_eq!(Machines::from_env(env(&[]))?, Machines::single());
        let torchrun = env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ]);
        assert_eq!(
            Machines::from_env(torchrun)?,
            Machines { rank: 1, count: 2, master_addr: "node0".into(), master_port: 1234 }
        );
        let slurm = env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
        ]);
        assert_eq!(
            Machines::from_env(slurm)?,
            Machines { rank: 1, count: 2, master_addr: "gpu07".into(), master_port: DEFAULT_MASTER_PORT }
        );
        // One Slurm task on one node is no world at all.
        let alone = env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_JOB_NODELIST", "gpu07")]);
        assert_eq!(Machines::from_env(alone)?, Machines::single());
        Ok(())
    }

    #[test]
    fn a_launch_of_one_process_per_gpu_is_refused_with_the_fix() {
        let per_gpu = env(&[("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "3"), ("MASTER_ADDR", "n")]);
        let error = Machines::from_env(per_gpu).unwrap_err().to_string();
        assert!(error.contains("one nanoflow per machine") && error.contains("--nproc-per-node=1"), "{error}");
        let bad = env(&[("RANK", "x"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "n")]);
        assert!(Machines::from_env(bad).unwrap_err().to_string().contains("`RANK=x` is not a number"));
        let missing = env(&[("WORLD_SIZE", "2"), ("RANK", "0")]);
        assert!(Machines::from_env(missing).unwrap_err().to_string().contains("MASTER_ADDR"));
    }

    #[test]
    fn slurm_node_lists() -> anyhow::Result<()> {
        assert_eq!(first_host("gpu[01-04,07],cpu1")?, "gpu01");
        assert_eq!(first_host("node3,node4")?, "node3");
        assert_eq!(first_host("solo")?, "solo");
        assert_eq!(first_host("a[9,1]")?, "a9");
        assert!(first_host("").is_err());
        Ok(())
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn ranks_average_bucketed_gradients_and_the_loss() -> anyhow::Result<()> {
        let master = format!("127.0.0.1:{}", free_port());
        let size = 3;
        let results: Vec<(Vec<Vec<f32>>, f32)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..size)
                .map(|rank| {
                    let world = World { rank, size, local_rank: rank, master: master.clone() };
                    scope.spawn(move || -> anyhow::Result<_> {
                        let mut collective = TcpCollective::new(Rendezvous::join(&world)?);
                        let r = rank as f32;
                        let mut grads = vec![
                            Tensor::new(&[[r, 1.0], [2.0, 3.0 * r]], &Device::Cpu)?,
                            Tensor::new(&[10.0 * r], &Device::Cpu)?,
                        ];
                        let loss = average(&mut collective, &mut grads, &Tensor::new(r + 1.0, &Device::Cpu)?)?;
                        let grads = grads
                            .iter()
                            .map(|g| g.flatten_all()?.to_vec1::<f32>())
                            .collect::<candle_core::Result<_>>()?;
                        Ok((grads, loss.to_scalar::<f32>()?))
                    })
                })
                .collect();
            handles.into_iter().map(|handle| handle.join().unwrap().unwrap()).collect()
        });
        for (grads, loss) in &results {
            assert_eq!(grads, &vec![vec![1.0, 1.0, 2.0, 3.0], vec![10.0]]);
            assert_eq!(*loss, 2.0);
        }
        Ok(())
    }

    #[test]
    fn a_rank_that_exits_fails_the_others_instead_of_hanging() {
        let master = format!("127.0.0.1:{}", free_port());
        let error = std::thread::scope(|scope| {
            let peer = World { rank: 1, size: 2, local_rank: 1, master: master.clone() };
            scope.spawn(move || drop(Rendezvous::join(&peer).unwrap()));
            let world = World { rank: 0, size: 2, local_rank: 0, master: master.clone() };
            let mut collective = TcpCollective::new(Rendezvous::join(&world).unwrap());
            collective.all_reduce_mean(&Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()).unwrap_err()
        });
        assert!(format!("{error:#}").contains("lost rank 1"), "{error:#}");
    }
}
