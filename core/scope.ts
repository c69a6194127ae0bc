/**
 * Deterministic release of GPU memory: `scope(fn)` frees every tensor created while `fn` runs, except the tensors
 * `fn` returns and those marked with {@linkcode keep} (parameters, gradients, optimizer state). Graph nodes made
 * inside the scope that the returned tensors do not reach are released too, so a forward pass without a
 * backward leaves nothing behind.
 *
 * @example
 * ```ts
 * import { scope } from "./scope.ts";
 * const loss = scope(() => {
 *   const l = model.forward(x, { labels }).loss!;
 *   l.backward();
 *   return l.detach(); // survives the scope; everything else is freed
 * });
 * ```
 * @module
 */
import type { Tensor } from "./tensor.ts";

interface Frame {
  tensors: Tensor[];
}

const frames: Frame[] = [];

/** Registers a newly created tensor with the innermost scope (no-op outside scopes). */
export function track(t: Tensor): void {
  frames[frames.length - 1]?.tensors.push(t);
}

/**
 * Marks tensors as owned by the caller: no enclosing scope will dispose them. Returns its argument.
 *
 * @example
 * ```ts
 * const state = keep(zeros([10]));
 * ```
 */
export function keep<T extends Tensor | Tensor[]>(t: T): T {
  for (const x of Array.isArray(t) ? t : [t]) x.kept = true;
  return t;
}

/**
 * Runs `fn` and disposes every tensor it created except what it returns (tensors found in the returned value,
 * searched through arrays, plain objects and Maps) and kept tensors. Works for async `fn` too, but then no other
 * code may create tensors while it awaits.
 *
 * @example
 * ```ts
 * const y = scope(() => x.mul(w).add(b).relu());
 * ```
 */
export function scope<T>(fn: () => T): T {
  const frame: Frame = { tensors: [] };
  frames.push(frame);
  let result: T;
  try {
    result = fn();
  } catch (e) {
    close(frame, undefined);
    throw e;
  }
  if (result instanceof Promise) {
    return result.then(
      (v) => {
        close(frame, v);
        return v;
      },
      (e) => {
        close(frame, undefined);
        throw e;
      },
    ) as T;
  }
  close(frame, result);
  return result;
}

function close(frame: Frame, result: unknown): void {
  const i = frames.lastIndexOf(frame);
  if (i >= 0) frames.splice(i, 1);
  const survivors = new Set<Tensor>();
  collect(result, survivors, 0);
  // Nodes reachable from the survivors (returned or kept tensors) stay; every other node made here is released.
  const reachable = new Set<unknown>();
  const stack = [...survivors, ...frame.tensors.filter((t) => t.kept && !t.disposed)];
  while (stack.length) {
    const t = stack.pop()!;
    const node = t.node;
    if (!node || reachable.has(node)) continue;
    reachable.add(node);
    stack.push(...node.inputs);
  }
  const parent = frames[frames.length - 1];
  for (const t of frame.tensors) {
    if (survivors.has(t)) {
      parent?.tensors.push(t);
      continue;
    }
    if (t.node && !reachable.has(t.node)) t.node.release();
    if (!t.kept) t.dispose();
  }
}

function collect(v: unknown, out: Set<Tensor>, depth: number): void {
  if (v === null || typeof v !== "object" || depth > 4) return;
  if (isTensor(v)) {
    out.add(v);
    return;
  }
  if (Array.isArray(v)) { for (const x of v) collect(x, out, depth + 1); }
  else if (v instanceof Map) { for (const x of v.values()) collect(x, out, depth + 1); }
  else if (Object.getPrototypeOf(v) === Object.prototype) {
    for (const x of Object.values(v)) {
      collect(x, out, depth + 1);
    }
  }
}

function isTensor(v: object): v is Tensor {
  return (v as { isTensor?: boolean }).isTensor === true;
}
