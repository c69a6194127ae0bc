/**
 * The GPU device and the dispatch path: one command encoder and one open compute pass that every kernel is
 * recorded into, submitted in batches; pipelines cached by WGSL source; bind groups cached by (pipeline layout,
 * buffers); kernel parameters written into one uniform arena per submission and selected with dynamic offsets.
 *
 * Costs measured through Deno on an H200 (DESIGN.md) shaped this: a dispatch inside an open pass costs ~10 µs end
 * to end, one pass per dispatch ~84 µs, one submit per dispatch ~170 µs; a new bind group costs 15 µs of CPU,
 * a cached one 1.4 µs; a read-back costs ~11 ms. So nothing here ends a pass or submits unless it must.
 *
 * @example
 * ```ts
 * import { initGpu } from "./gpu.ts";
 * const gpu = await initGpu();
 * console.log(gpu.info.description, gpu.info.shaderF16);
 * ```
 * @module
 */

/** What the adapter is and what it can do. */
export interface GpuInfo {
  /** Adapter description, e.g. "NVIDIA H200" or "llvmpipe (LLVM 15.0.6, 256 bits)". */
  description: string;
  /** Vendor string or id. */
  vendor: string;
  /** True for a software or fallback adapter (e.g. Mesa lavapipe). */
  isFallback: boolean;
  /** Whether the device was created with `shader-f16`. */
  shaderF16: boolean;
  /** Whether the device was created with `timestamp-query`. */
  timestampQuery: boolean;
  /** Largest storage buffer binding, bytes. */
  maxStorageBufferBindingSize: number;
  /** Largest buffer, bytes. */
  maxBufferSize: number;
  /** Workgroup (shared) memory per workgroup, bytes. */
  maxComputeWorkgroupStorageSize: number;
  /** Most invocations in one workgroup. */
  maxComputeInvocationsPerWorkgroup: number;
  /** Most storage buffers one kernel binds (the optimizers' multi-tensor kernels size their groups by it). */
  maxStorageBuffersPerShaderStage: number;
}

/** Options of {@linkcode initGpu}. */
export interface GpuOptions {
  /** Adapter preference; default "high-performance". */
  powerPreference?: GPUPowerPreference;
  /** Dispatches recorded before the batch is submitted automatically (default 256). */
  dispatchesPerSubmit?: number;
}

/** Bind-group slot kinds of a kernel's storage buffers, in binding order from @binding(1). */
export type BindingKind = "read" | "write";

/** A compiled compute kernel: WGSL with an optional uniform block at @binding(0) and storage buffers after it. */
export interface Kernel {
  /** Short name for errors and profiles. */
  readonly name: string;
  /** The compute pipeline. */
  readonly pipeline: GPUComputePipeline;
  /** Layout key: uniform flag + binding kinds. */
  readonly layoutKey: string;
  /** The bind group layout. */
  readonly layout: GPUBindGroupLayout;
  /** Whether @binding(0) is the uniform parameter block. */
  readonly hasUniforms: boolean;
  /** Storage binding kinds, from @binding(1). */
  readonly bindings: readonly BindingKind[];
}

/** What a generator returns: a complete WGSL module whose entry point is `main`. */
export interface KernelSource {
  /** Short name for errors and profiles. */
  name: string;
  /** WGSL source. Declare `@group(0) @binding(0) var<uniform> p: Params;` when `uniforms` is true. */
  code: string;
  /** Storage buffers at @binding(1), @binding(2), ... */
  bindings: BindingKind[];
  /** Whether binding 0 is a uniform block (at most {@linkcode UNIFORM_SLOT} bytes). */
  uniforms: boolean;
}

/** Bytes of uniform data one dispatch may use (one dynamic-offset slot). */
export const UNIFORM_SLOT = 256;
const ARENA_SLOTS = 4096;

const NO_ADAPTER_HELP = "No WebGPU adapter found. webtune needs a GPU driver with Vulkan (Linux), Metal (macOS) or " +
  "D3D12 (Windows). On a Linux machine without a GPU, install the software Vulkan driver: " +
  "`apt-get install -y mesa-vulkan-drivers` (lavapipe; slow, but enough for tests). In a browser, use one with WebGPU.";

let current: Gpu | null = null;
let pending: Promise<Gpu> | null = null;

/**
 * Acquires the adapter and device once (later calls return the same {@linkcode Gpu}). Requests the adapter's
 * largest storage-binding, buffer and workgroup-memory limits, and `shader-f16` / `timestamp-query` when present.
 *
 * @example
 * ```ts
 * const gpu = await initGpu();
 * ```
 */
export function initGpu(options: GpuOptions = {}): Promise<Gpu> {
  if (current) return Promise.resolve(current);
  pending ??= createGpu(options).then((g) => (current = g)).finally(() => (pending = null));
  return pending;
}

async function createGpu(options: GpuOptions): Promise<Gpu> {
  const nav = (globalThis as { navigator?: { gpu?: GPU } }).navigator;
  if (!nav?.gpu) throw new Error(`WebGPU is not available in this runtime. ${NO_ADAPTER_HELP}`);
  let adapter: GPUAdapter | null = null;
  try {
    adapter = await nav.gpu.requestAdapter({ powerPreference: options.powerPreference ?? "high-performance" });
  } catch (e) {
    throw new Error(`${NO_ADAPTER_HELP} (requestAdapter failed: ${(e as Error).message})`);
  }
  if (!adapter) throw new Error(NO_ADAPTER_HELP);
  const wanted: GPUFeatureName[] = ["shader-f16", "timestamp-query"];
  const features = wanted.filter((f) => adapter!.features.has(f));
  const l = adapter.limits;
  const device = await adapter.requestDevice({
    requiredFeatures: features,
    requiredLimits: {
      maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
      maxBufferSize: l.maxBufferSize,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
      maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupSizeX: l.maxComputeWorkgroupSizeX,
      maxComputeWorkgroupSizeY: l.maxComputeWorkgroupSizeY,
      maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
    },
  });
  const info = adapter.info;
  return new Gpu(device, {
    description: info.description || info.device || "unknown adapter",
    vendor: info.vendor,
    isFallback: (info as { isFallbackAdapter?: boolean }).isFallbackAdapter ?? false,
    shaderF16: features.includes("shader-f16"),
    timestampQuery: features.includes("timestamp-query"),
    maxStorageBufferBindingSize: device.limits.maxStorageBufferBindingSize,
    maxBufferSize: device.limits.maxBufferSize,
    maxComputeWorkgroupStorageSize: device.limits.maxComputeWorkgroupStorageSize,
    maxComputeInvocationsPerWorkgroup: device.limits.maxComputeInvocationsPerWorkgroup,
    maxStorageBuffersPerShaderStage: device.limits.maxStorageBuffersPerShaderStage,
  }, options);
}

/**
 * The device already acquired by {@linkcode initGpu}; throws a clear error before that.
 *
 * @example
 * ```ts
 * await initGpu();
 * const g = getGpu();
 * ```
 */
export function getGpu(): Gpu {
  if (!current) {
    throw new Error("The GPU is not initialised: call `await init()` (from webtune) once before creating tensors.");
  }
  return current;
}

/** True once {@linkcode initGpu} has finished. */
export function gpuReady(): boolean {
  return current !== null;
}

/** Ids for buffers, used in bind-group cache keys. */
const bufferIds = new WeakMap<GPUBuffer, number>();
let nextBufferId = 1;
function bufferId(b: GPUBuffer): number {
  let id = bufferIds.get(b);
  if (id === undefined) bufferIds.set(b, id = nextBufferId++);
  return id;
}

/** The device, its caches and the open command stream. Get it with {@linkcode initGpu} or {@linkcode getGpu}. */
export class Gpu {
  /** The WebGPU device. */
  readonly device: GPUDevice;
  /** What the adapter is and can do. */
  readonly info: GpuInfo;
  /** Dispatches recorded so far (for tests and profiles). */
  dispatchCount = 0;
  /** Submissions so far. */
  submitCount = 0;
  private readonly dispatchesPerSubmit: number;
  private readonly kernels = new Map<string, Kernel>();
  private readonly layouts = new Map<string, GPUBindGroupLayout>();
  private readonly bindGroups = new Map<string, GPUBindGroup>();
  private encoder: GPUCommandEncoder | null = null;
  private pass: GPUComputePassEncoder | null = null;
  private readonly arena: GPUBuffer;
  private readonly arenaData = new Uint8Array(UNIFORM_SLOT * ARENA_SLOTS);
  private arenaUsed = 0;
  private recorded = 0;
  private timing = false;
  private lost: string | null = null;
  private validationError: string | null = null;
  private readonly afterSubmit: (() => void)[] = [];

  /** Use {@linkcode initGpu}. */
  constructor(device: GPUDevice, info: GpuInfo, options: GpuOptions = {}) {
    this.device = device;
    this.info = info;
    this.dispatchesPerSubmit = options.dispatchesPerSubmit ?? 256;
    this.arena = device.createBuffer({
      size: this.arenaData.byteLength,
      usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
    });
    device.lost.then((e) => {
      this.lost = `${e.reason}: ${e.message}`;
      if (current === this) current = null;
    });
    device.addEventListener("uncapturederror", (e) => {
      const msg = (e as GPUUncapturedErrorEvent).error.message;
      this.validationError ??= msg;
    });
  }

  /** Throws when the device is lost or a GPU error has been reported since the last check. */
  checkHealth(): void {
    if (this.lost) {
      throw new Error(
        `The GPU device was lost (${this.lost}). Its tensors are gone: restart the program ` +
          "(on a real GPU this follows a driver reset, a timeout of a very long kernel, or running out of memory).",
      );
    }
    if (this.validationError) {
      const msg = this.validationError;
      this.validationError = null;
      throw new Error(`WebGPU reported an error: ${msg}`);
    }
  }

  /** Compiles (once per distinct source) and returns a kernel. */
  kernel(src: KernelSource): Kernel {
    const cached = this.kernels.get(src.code);
    if (cached) return cached;
    const layoutKey = (src.uniforms ? "u" : "-") + src.bindings.map((b) => (b === "read" ? "r" : "w")).join("");
    let layout = this.layouts.get(layoutKey);
    if (!layout) {
      const entries: GPUBindGroupLayoutEntry[] = [];
      if (src.uniforms) {
        entries.push({
          binding: 0,
          visibility: GPUShaderStage.COMPUTE,
          buffer: { type: "uniform", hasDynamicOffset: true, minBindingSize: 0 },
        });
      }
      src.bindings.forEach((kind, i) =>
        entries.push({
          binding: i + 1,
          visibility: GPUShaderStage.COMPUTE,
          buffer: { type: kind === "read" ? "read-only-storage" : "storage" },
        })
      );
      layout = this.device.createBindGroupLayout({ entries });
      this.layouts.set(layoutKey, layout);
    }
    const module = this.device.createShaderModule({ code: src.code, label: src.name });
    const pipeline = this.device.createComputePipeline({
      label: src.name,
      layout: this.device.createPipelineLayout({ bindGroupLayouts: [layout] }),
      compute: { module, entryPoint: "main" },
    });
    const k: Kernel = {
      name: src.name,
      pipeline,
      layoutKey,
      layout,
      hasUniforms: src.uniforms,
      bindings: src.bindings,
    };
    this.kernels.set(src.code, k);
    return k;
  }

  /**
   * Records one dispatch into the open compute pass. `uniforms` (at most 256 bytes) becomes the kernel's
   * `var<uniform> p`. The work runs when the batch is submitted (automatically every few hundred dispatches, at
   * a read-back, or at {@linkcode Gpu.flush}).
   */
  dispatch(
    k: Kernel,
    buffers: GPUBuffer[],
    uniforms: Uint32Array | null,
    groups: readonly [number, number?, number?],
  ): void {
    this.checkHealth();
    if (buffers.length !== k.bindings.length) {
      throw new Error(`kernel ${k.name} takes ${k.bindings.length} buffers, got ${buffers.length}`);
    }
    const [x, y = 1, z = 1] = groups;
    if (x === 0 || y === 0 || z === 0) return;
    const maxGroups = this.device.limits.maxComputeWorkgroupsPerDimension;
    if (x > maxGroups || y > maxGroups || z > maxGroups) {
      throw new Error(`kernel ${k.name}: grid ${x}×${y}×${z} exceeds ${maxGroups} workgroups per dimension`);
    }
    if (k.hasUniforms && this.arenaUsed + UNIFORM_SLOT > this.arenaData.byteLength) {
      if (this.timing) throw new Error(`a timed region may record at most ${ARENA_SLOTS} dispatches`);
      this.flush();
    }
    const pass = this.openPass();
    pass.setPipeline(k.pipeline);
    pass.setBindGroup(0, this.bindGroup(k, buffers), k.hasUniforms ? [this.pushUniforms(uniforms)] : []);
    pass.dispatchWorkgroups(x, y, z);
    this.dispatchCount++;
    if (++this.recorded >= this.dispatchesPerSubmit && !this.timing) this.flush();
  }

  private pushUniforms(u: Uint32Array | null): number {
    const offset = this.arenaUsed;
    if (u) {
      if (u.byteLength > UNIFORM_SLOT) throw new Error(`uniform block of ${u.byteLength} bytes > ${UNIFORM_SLOT}`);
      this.arenaData.set(new Uint8Array(u.buffer, u.byteOffset, u.byteLength), offset);
    }
    this.arenaUsed += UNIFORM_SLOT;
    return offset;
  }

  private bindGroup(k: Kernel, buffers: GPUBuffer[]): GPUBindGroup {
    let key = k.layoutKey;
    for (const b of buffers) key += "," + bufferId(b);
    let bg = this.bindGroups.get(key);
    if (!bg) {
      if (this.bindGroups.size > 50_000) this.bindGroups.clear();
      const entries: GPUBindGroupEntry[] = buffers.map((buffer, i) => ({ binding: i + 1, resource: { buffer } }));
      if (k.hasUniforms) {
        entries.unshift({ binding: 0, resource: { buffer: this.arena, offset: 0, size: UNIFORM_SLOT } });
      }
      bg = this.device.createBindGroup({ layout: k.layout, entries });
      this.bindGroups.set(key, bg);
    }
    return bg;
  }

  private openPass(): GPUComputePassEncoder {
    if (!this.pass) {
      this.encoder ??= this.device.createCommandEncoder();
      this.pass = this.encoder.beginComputePass();
    }
    return this.pass;
  }

  /** True when dispatches are recorded but not yet submitted. */
  get hasPendingWork(): boolean {
    return this.encoder !== null;
  }

  /** Runs `fn` after the next submission (the buffer pool uses it to recycle buffers safely). */
  onNextSubmit(fn: () => void): void {
    if (this.encoder === null) fn();
    else this.afterSubmit.push(fn);
  }

  /** Submits everything recorded so far. Cheap when nothing is pending. */
  flush(): void {
    this.checkHealth();
    if (!this.encoder) return;
    if (this.pass) {
      this.pass.end();
      this.pass = null;
    }
    if (this.arenaUsed > 0) {
      this.device.queue.writeBuffer(this.arena, 0, this.arenaData, 0, this.arenaUsed);
      this.arenaUsed = 0;
    }
    this.device.queue.submit([this.encoder.finish()]);
    this.encoder = null;
    this.recorded = 0;
    this.submitCount++;
    const callbacks = this.afterSubmit.splice(0);
    for (const fn of callbacks) fn();
  }

  /** Waits until the GPU has finished all submitted work. */
  async sync(): Promise<void> {
    this.flush();
    await this.device.queue.onSubmittedWorkDone();
    this.checkHealth();
  }

  /** Records a buffer-to-buffer copy (ends the open pass; use sparingly). */
  copy(src: GPUBuffer, srcOffset: number, dst: GPUBuffer, dstOffset: number, bytes: number): void {
    if (this.pass) {
      this.pass.end();
      this.pass = null;
    }
    this.encoder ??= this.device.createCommandEncoder();
    this.encoder.copyBufferToBuffer(src, srcOffset, dst, dstOffset, bytes);
  }

  /** Uploads bytes into a buffer that no recorded-but-unsubmitted work uses (a freshly allocated one). */
  write(dst: GPUBuffer, dstOffset: number, data: ArrayBufferView): void {
    this.checkHealth();
    const bytes = new Uint8Array(data.buffer as ArrayBuffer, data.byteOffset, data.byteLength);
    const padded = bytes.byteLength % 4 === 0 ? bytes : padTo4(bytes);
    this.device.queue.writeBuffer(dst, dstOffset, padded, 0, padded.byteLength);
  }

  /** Reads `bytes` bytes of `src` from `offset` back to the CPU (submits pending work; ~11 ms round trip). */
  async read(src: GPUBuffer, offset: number, bytes: number): Promise<ArrayBuffer> {
    const start = offset & ~3;
    const size = Math.ceil((offset + bytes - start) / 4) * 4;
    const staging = this.device.createBuffer({ size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    try {
      this.copy(src, start, staging, 0, size);
      this.flush();
      await staging.mapAsync(GPUMapMode.READ);
      this.checkHealth();
      return staging.getMappedRange().slice(offset - start, offset - start + bytes);
    } catch (e) {
      this.checkHealth();
      throw e;
    } finally {
      staging.destroy();
    }
  }

  /**
   * GPU time of the work `fn` records, in milliseconds, from timestamp queries when the device has them,
   * otherwise from queue completion (which includes submission overhead). `fn` may record at most 4096 dispatches.
   */
  async time(fn: () => void): Promise<number> {
    await this.sync();
    if (!this.info.timestampQuery) {
      const t0 = performance.now();
      fn();
      await this.sync();
      return performance.now() - t0;
    }
    const querySet = this.device.createQuerySet({ type: "timestamp", count: 2 });
    const resolve = this.device.createBuffer({
      size: 16,
      usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
    });
    this.encoder = this.device.createCommandEncoder();
    this.pass = this.encoder.beginComputePass({
      timestampWrites: { querySet, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 },
    });
    this.timing = true;
    try {
      fn();
    } finally {
      this.timing = false;
    }
    this.pass.end();
    this.pass = null;
    this.encoder.resolveQuerySet(querySet, 0, 2, resolve, 0);
    const raw = await this.read(resolve, 0, 16);
    const [t0, t1] = new BigUint64Array(raw);
    querySet.destroy();
    resolve.destroy();
    return Number(t1 - t0) / 1e6;
  }

  /** Drops cached bind groups that may reference destroyed buffers. */
  clearBindGroups(): void {
    this.bindGroups.clear();
  }

  /** Number of compiled kernels (for tests). */
  get kernelCount(): number {
    return this.kernels.size;
  }
}

function padTo4(bytes: Uint8Array): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(Math.ceil(bytes.byteLength / 4) * 4);
  out.set(bytes);
  return out;
}
