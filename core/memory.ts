/**
 * The GPU buffer pool and its accounting, the equivalent of PyTorch's caching allocator and
 * `torch.cuda.max_memory_allocated()`.
 *
 * Every tensor's storage comes from here. Sizes are rounded up to a size class (at most 1/16 above the request,
 * 256 bytes at least) so that freed buffers can be reused by later requests of similar size. `liveBytes` counts
 * the bytes of buffers handed out to tensors, `pooledBytes` those kept for reuse, and `peakBytes` the largest
 * `liveBytes` seen since the last {@linkcode resetPeakMemory}. A buffer released while recorded-but-unsubmitted
 * work may still use it is recycled only after that work is submitted (queue order then keeps it safe).
 *
 * @example
 * ```ts
 * import { memoryStats, resetPeakMemory } from "./memory.ts";
 * resetPeakMemory();
 * // ... run a training step ...
 * console.log(memoryStats().peakBytes / 2 ** 30, "GiB");
 * ```
 * @module
 */
import { getGpu } from "./gpu.ts";

/** Current GPU memory accounting. */
export interface MemoryStats {
  /** Bytes of GPU buffers currently held by tensors. */
  liveBytes: number;
  /** Largest `liveBytes` since the start or the last {@linkcode resetPeakMemory}. */
  peakBytes: number;
  /** Bytes of free buffers the pool keeps for reuse. */
  pooledBytes: number;
  /** Number of buffers held by tensors. */
  liveBuffers: number;
}

/** Rounds a request up to its size class: 256 bytes at least, then steps of 1/16 of the power of two below. */
export function sizeClass(bytes: number): number {
  if (bytes <= 256) return 256;
  const step = 2 ** Math.max(8, Math.floor(Math.log2(bytes)) - 4);
  return Math.ceil(bytes / step) * step;
}

const USAGE = () => GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

class BufferPool {
  liveBytes = 0;
  peakBytes = 0;
  pooledBytes = 0;
  liveBuffers = 0;
  private readonly free = new Map<number, GPUBuffer[]>();

  acquire(bytes: number): GPUBuffer {
    const gpu = getGpu();
    const size = sizeClass(bytes);
    if (size > gpu.info.maxBufferSize) {
      throw new Error(
        `A tensor of ${fmtBytes(bytes)} exceeds this GPU's largest buffer (${fmtBytes(gpu.info.maxBufferSize)})`,
      );
    }
    let buffer = this.free.get(size)?.pop();
    if (buffer) this.pooledBytes -= size;
    else buffer = gpu.device.createBuffer({ size, usage: USAGE() });
    this.liveBytes += size;
    this.liveBuffers++;
    if (this.liveBytes > this.peakBytes) this.peakBytes = this.liveBytes;
    return buffer;
  }

  release(buffer: GPUBuffer): void {
    const size = buffer.size;
    this.liveBytes -= size;
    this.liveBuffers--;
    this.pooledBytes += size;
    getGpu().onNextSubmit(() => {
      let list = this.free.get(size);
      if (!list) this.free.set(size, list = []);
      list.push(buffer);
    });
  }

  /** Caches held by ops (e.g. matmul's split-K scratch) that `emptyCache` also releases. */
  readonly releasers: (() => void)[] = [];

  emptyCache(): void {
    for (const release of this.releasers) release();
    const gpu = getGpu();
    gpu.flush();
    for (const list of this.free.values()) for (const b of list) b.destroy();
    this.free.clear();
    this.pooledBytes = 0;
    gpu.clearBindGroups();
  }
}

/** The process-wide pool. */
export const pool: BufferPool = new BufferPool();

/**
 * Live, peak and pooled GPU bytes.
 *
 * @example
 * ```ts
 * const { liveBytes, peakBytes } = memoryStats();
 * ```
 */
export function memoryStats(): MemoryStats {
  return {
    liveBytes: pool.liveBytes,
    peakBytes: pool.peakBytes,
    pooledBytes: pool.pooledBytes,
    liveBuffers: pool.liveBuffers,
  };
}

/**
 * Starts a new peak measurement at the current live bytes.
 *
 * @example
 * ```ts
 * resetPeakMemory();
 * ```
 */
export function resetPeakMemory(): void {
  pool.peakBytes = pool.liveBytes;
}

/**
 * Registers a cache an op keeps (a reusable scratch buffer) so that {@linkcode emptyCache} releases it too.
 *
 * @example
 * ```ts
 * onEmptyCache(() => releaseMyScratch());
 * ```
 */
export function onEmptyCache(release: () => void): void {
  pool.releasers.push(release);
}

/**
 * Frees the pool's cached buffers and the ops' scratch buffers (live tensors are untouched), like
 * `torch.cuda.empty_cache()`.
 *
 * @example
 * ```ts
 * emptyCache();
 * ```
 */
export function emptyCache(): void {
  pool.emptyCache();
}

/** Formats a byte count for messages: "1.50 GiB". */
export function fmtBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(2)} ${units[u]}`;
}
