/**
 * Differentiable elementwise ops with broadcasting: arithmetic, unary functions, comparisons, `where`, casts.
 * Arithmetic happens in f32 (integers exactly in i32/u32 when every input is an integer tensor); results keep the
 * promoted input dtype, so f16 tensors stay f16 in memory. Each backward rule is itself one fused kernel where
 * the math allows (e.g. `silu`'s gradient is one pass over `g` and `x`).
 *
 * @example
 * ```ts
 * import { add, mul, silu } from "./elementwise.ts";
 * const y = silu(add(mul(x, w), 1));
 * ```
 * @module
 */
import { type DType, isFloat, promote } from "../dtype.ts";
import { record } from "../autograd.ts";
import type { Tensor } from "../tensor.ts";
import { elementwise } from "./dispatch.ts";
import { sumTo } from "./reduce.ts";

type Operand = Tensor | number;

/** WGSL helpers shared by several expressions. */
const MATH = `
fn sigm(x: f32) -> f32 { if (x >= 0.0) { return 1.0 / (1.0 + exp(-x)); } let e = exp(x); return e / (1.0 + e); }
fn tanhSafe(x: f32) -> f32 {
  let q = x * x;
  if (q < 0.09) {
    // |x| < 0.3: Taylor series to x^11 (next term < 2e-9 relative); 1 − e^(−2|x|) would cancel catastrophically.
    return x * (1.0 + q * (-0.33333333333 + q * (0.13333333333 + q * (-0.053968253968 + q * (0.021869488536 +
      q * -0.0088632355299)))));
  }
  let e = exp(-2.0 * abs(x));
  return sign(x) * (1.0 - e) / (1.0 + e);
}
fn erfcPos(z: f32) -> f32 {
  // erfc(z) for z ≥ 0: Numerical Recipes' Chebyshev fit, fractional error < 1.2e-7 (so the tail stays accurate).
  let t = 1.0 / (1.0 + 0.5 * z);
  return t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 +
    t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))));
}
fn phi(x: f32) -> f32 {
  // The normal CDF Φ(x) = erfc(−x/√2)/2, without forming 1 + erf(x/√2), which cancels for x ≪ 0.
  let r = erfcPos(abs(x) * 0.70710678118654752);
  return select(0.5 * r, 1.0 - 0.5 * r, x >= 0.0);
}
fn powf(x: f32, e: f32) -> f32 {
  if (e == 0.0) { return 1.0; }
  if (e == 1.0) { return x; }
  if (e == 2.0) { return x * x; }
  let r = pow(abs(x), e);
  if (x >= 0.0) { return r; }
  if (round(e) != e) { return bitcast<f32>(0x7fc00000u); }
  return select(r, -r, fract(e * 0.5) != 0.0);
}`;

function isTensorLike(v: Operand): v is Tensor {
  return typeof v === "object";
}

function floatOut(...ts: Tensor[]): DType {
  const d = promote(...ts.map((t) => t.dtype));
  return isFloat(d) ? d : "f32";
}

// ---- binary arithmetic ----------------------------------------------------------------------------------------

function binary(name: string, expr: string, scalarExpr: string, a: Tensor, b: Operand): Tensor {
  if (!isTensorLike(b)) {
    const out = a.dtype === "f32" || a.dtype === "f16" ? a.dtype : "f32";
    return elementwise(name, scalarExpr, [a], { out, c0: b, helpers: MATH });
  }
  const dt = promote(a.dtype, b.dtype);
  if (!isFloat(dt)) return elementwise(name, expr, [a, b], { out: dt, compute: dt as "i32" | "u32" });
  return elementwise(name, expr, [a, b], { out: dt, helpers: MATH });
}

/**
 * `a + b` with broadcasting; `b` may be a number.
 *
 * @example
 * ```ts
 * const y = add(x, 1);
 * ```
 */
export function add(a: Tensor, b: Operand): Tensor {
  const out = binary("add", "a + b", "a + p.c0", a, b);
  if (!isTensorLike(b)) return record(out, "add", [a], [], (g) => [gradTo(g, a.shape)]);
  return record(
    out,
    "add",
    [a, b],
    [],
    (g, _s, n) => [n[0] ? gradTo(g, a.shape) : null, n[1] ? gradTo(g, b.shape) : null],
  );
}

/**
 * `g` summed down to `shape`, always as a new handle: a backward rule must not return `g` itself (the caller
 * disposes `g` after the rule) nor one tensor for two inputs (each input's gradient is owned separately).
 */
function gradTo(g: Tensor, shape: readonly number[]): Tensor {
  const r = sumTo(g, shape);
  return r === g ? g.detach() : r;
}

/**
 * `a - b` with broadcasting.
 *
 * @example
 * ```ts
 * const d = sub(x, y);
 * ```
 */
export function sub(a: Tensor, b: Operand): Tensor {
  const out = binary("sub", "a - b", "a - p.c0", a, b);
  if (!isTensorLike(b)) return record(out, "sub", [a], [], (g) => [gradTo(g, a.shape)]);
  return record(
    out,
    "sub",
    [a, b],
    [],
    (g, _s, n) => [n[0] ? gradTo(g, a.shape) : null, n[1] ? negSum(g, b.shape) : null],
  );
}

/**
 * `a * b` with broadcasting.
 *
 * @example
 * ```ts
 * const y = mul(x, 0.5);
 * ```
 */
export function mul(a: Tensor, b: Operand): Tensor {
  const out = binary("mul", "a * b", "a * p.c0", a, b);
  if (!isTensorLike(b)) {
    return record(
      out,
      "mul",
      [a],
      [],
      (g) => [reduced(elementwise("mul", "a * p.c0", [g], { out: g.dtype, c0: b }), a.shape)],
    );
  }
  return record(out, "mul", [a, b], [a, b], (g, [sa, sb], n) => [
    n[0] ? reduced(elementwise("mul", "a * b", [g, sb], { out: floatOut(g) }), a.shape) : null,
    n[1] ? reduced(elementwise("mul", "a * b", [g, sa], { out: floatOut(g) }), b.shape) : null,
  ]);
}

/**
 * `a / b` with broadcasting.
 *
 * @example
 * ```ts
 * const y = div(x, 4);
 * ```
 */
export function div(a: Tensor, b: Operand): Tensor {
  const out = binary("div", "a / b", "a / p.c0", a, b);
  if (!isTensorLike(b)) {
    return record(
      out,
      "div",
      [a],
      [],
      (g) => [reduced(elementwise("div", "a / p.c0", [g], { out: g.dtype, c0: b }), a.shape)],
    );
  }
  return record(out, "div", [a, b], [a, b], (g, [sa, sb], n) => [
    n[0] ? reduced(elementwise("div", "a / b", [g, sb], { out: floatOut(g) }), a.shape) : null,
    // d(a/b)/db = -a / b²
    n[1] ? reduced(elementwise("div_db", "-a * b / (c * c)", [g, sa, sb], { out: floatOut(g) }), b.shape) : null,
  ]);
}

/**
 * Elementwise maximum of two tensors (the gradient goes to the larger input; half to each on ties).
 *
 * @example
 * ```ts
 * const y = maximum(x, zeros(x.shape));
 * ```
 */
export function maximum(a: Tensor, b: Tensor): Tensor {
  const out = binary("maximum", "max(a, b)", "max(a, p.c0)", a, b);
  return record(out, "maximum", [a, b], [a, b], (g, [sa, sb], n) => [
    n[0]
      ? reduced(
        elementwise("max_da", "a * select(select(0.0, 0.5, b == c), 1.0, b > c)", [g, sa, sb], { out: floatOut(g) }),
        a.shape,
      )
      : null,
    n[1]
      ? reduced(
        elementwise("max_db", "a * select(select(0.0, 0.5, b == c), 1.0, c > b)", [g, sa, sb], { out: floatOut(g) }),
        b.shape,
      )
      : null,
  ]);
}

function reduced(t: Tensor, shape: readonly number[]): Tensor {
  const r = sumTo(t, shape);
  if (r !== t) t.dispose();
  return r;
}

function negSum(g: Tensor, shape: readonly number[]): Tensor {
  return reduced(elementwise("neg", "-a", [g], { out: g.dtype }), shape);
}

// ---- unary ------------------------------------------------------------------------------------------------------

interface UnaryDef {
  expr: string;
  /** Gradient expression of g = `a`, x = `b`, y = `c` (the output), or null for no gradient. */
  grad: string | null;
  /** Which tensors the gradient needs: the input, the output, or both. */
  saves: "x" | "y" | "xy";
}

const UNARY: Record<string, UnaryDef> = {
  neg: { expr: "-a", grad: "-a", saves: "x" },
  exp: { expr: "exp(a)", grad: "a * c", saves: "y" },
  log: { expr: "log(a)", grad: "a / b", saves: "x" },
  sqrt: { expr: "sqrt(a)", grad: "a * 0.5 / c", saves: "y" },
  rsqrt: { expr: "inverseSqrt(a)", grad: "-0.5 * a * c * c * c", saves: "y" },
  tanh: { expr: "tanhSafe(a)", grad: "a * (1.0 - c * c)", saves: "y" },
  sigmoid: { expr: "sigm(a)", grad: "a * c * (1.0 - c)", saves: "y" },
  // silu'(x) = s(x) · (1 + x · (1 − s(x)))
  silu: { expr: "a * sigm(a)", grad: "a * sigm(b) * (1.0 + b * (1.0 - sigm(b)))", saves: "x" },
  relu: { expr: "max(a, 0.0)", grad: "select(0.0, a, b > 0.0)", saves: "x" },
  // gelu(x) = x·Φ(x); gelu'(x) = Φ(x) + x·φ(x)
  gelu: {
    expr: "a * phi(a)",
    grad: "a * (phi(b) + b * 0.39894228040143268 * exp(-0.5 * b * b))",
    saves: "x",
  },
  abs: { expr: "abs(a)", grad: "a * sign(b)", saves: "x" },
  square: { expr: "a * a", grad: "2.0 * a * b", saves: "x" },
};

function unary(name: keyof typeof UNARY, x: Tensor): Tensor {
  const def = UNARY[name];
  const y = elementwise(name, def.expr, [x], { out: floatOut(x), helpers: MATH });
  if (def.grad === null) return y;
  const save = def.saves === "x" ? [x] : def.saves === "y" ? [y] : [x, y];
  return record(y, name, [x], save, (g, saved) => {
    const xs = def.saves === "y" ? g : saved[0];
    const ys = def.saves === "x" ? g : saved[saved.length - 1];
    return [elementwise(`${name}_grad`, def.grad!, [g, xs, ys], { out: floatOut(g), helpers: MATH })];
  });
}

/** `-x`. @example `const y = neg(x);` */
export const neg = (x: Tensor): Tensor => unary("neg", x);
/** `e^x`. @example `const y = exp(x);` */
export const exp = (x: Tensor): Tensor => unary("exp", x);
/** Natural log. @example `const y = log(x);` */
export const log = (x: Tensor): Tensor => unary("log", x);
/** Square root. @example `const y = sqrt(x);` */
export const sqrt = (x: Tensor): Tensor => unary("sqrt", x);
/** `1/√x`. @example `const y = rsqrt(x);` */
export const rsqrt = (x: Tensor): Tensor => unary("rsqrt", x);
/** tanh, overflow-safe. @example `const y = tanh(x);` */
export const tanh = (x: Tensor): Tensor => unary("tanh", x);
/** Logistic sigmoid, overflow-safe. @example `const y = sigmoid(x);` */
export const sigmoid = (x: Tensor): Tensor => unary("sigmoid", x);
/** `x·sigmoid(x)` (SwiGLU's gate). @example `const y = silu(x);` */
export const silu = (x: Tensor): Tensor => unary("silu", x);
/** `max(x, 0)`. @example `const y = relu(x);` */
export const relu = (x: Tensor): Tensor => unary("relu", x);
/** Exact GELU `x·Φ(x)` (PyTorch's default). @example `const y = gelu(x);` */
export const gelu = (x: Tensor): Tensor => unary("gelu", x);
/** `|x|`. @example `const y = abs(x);` */
export const abs = (x: Tensor): Tensor => unary("abs", x);
/** `x²`. @example `const y = square(x);` */
export const square = (x: Tensor): Tensor => unary("square", x);

/**
 * `x ** e` for a scalar exponent (negative bases allowed for integer exponents).
 *
 * @example
 * ```ts
 * const y = pow(x, 3);
 * ```
 */
export function pow(x: Tensor, e: number): Tensor {
  const y = elementwise("pow", "powf(a, p.c0)", [x], { out: floatOut(x), c0: e, helpers: MATH });
  return record(y, "pow", [x], [x], (g, [sx]) => [
    elementwise("pow_grad", "a * p.c0 * powf(b, p.c0 - 1.0)", [g, sx], { out: floatOut(g), c0: e, helpers: MATH }),
  ]);
}

// ---- comparisons, selection, casts ------------------------------------------------------------------------------

function compare(name: string, op: string, a: Tensor, b: Operand): Tensor {
  if (!isTensorLike(b)) return elementwise(name, `select(0.0, 1.0, a ${op} p.c0)`, [a], { out: "u32", c0: b });
  return elementwise(name, `select(0.0, 1.0, a ${op} b)`, [a, b], { out: "u32" });
}

/** `a == b` as a u32 0/1 mask. @example `const m = eq(ids, 0);` */
export const eq = (a: Tensor, b: Operand): Tensor => compare("eq", "==", a, b);
/** `a != b` as a u32 0/1 mask. @example `const m = ne(ids, 0);` */
export const ne = (a: Tensor, b: Operand): Tensor => compare("ne", "!=", a, b);
/** `a < b` as a u32 0/1 mask. @example `const m = lt(x, 0);` */
export const lt = (a: Tensor, b: Operand): Tensor => compare("lt", "<", a, b);
/** `a <= b` as a u32 0/1 mask. @example `const m = le(x, 0);` */
export const le = (a: Tensor, b: Operand): Tensor => compare("le", "<=", a, b);
/** `a > b` as a u32 0/1 mask. @example `const m = gt(x, 0);` */
export const gt = (a: Tensor, b: Operand): Tensor => compare("gt", ">", a, b);
/** `a >= b` as a u32 0/1 mask. @example `const m = ge(x, 0);` */
export const ge = (a: Tensor, b: Operand): Tensor => compare("ge", ">=", a, b);

/**
 * `cond ? a : b` elementwise with broadcasting (`cond` nonzero means true); `a`/`b` may be numbers.
 *
 * @example
 * ```ts
 * const masked = where(mask, scores, -1e9);
 * ```
 */
export function where(cond: Tensor, a: Operand, b: Operand): Tensor {
  const ts = [cond];
  let ea = "p.c0", eb = "p.c1";
  if (isTensorLike(a)) {
    ts.push(a);
    ea = "b";
  }
  if (isTensorLike(b)) {
    ts.push(b);
    eb = ts.length === 3 ? "c" : "b";
  }
  const floats = ts.slice(1);
  const dt = floats.length ? floatOut(...floats) : "f32";
  const out = elementwise("where", `select(${eb}, ${ea}, a != 0.0)`, ts, {
    out: dt,
    c0: isTensorLike(a) ? 0 : a,
    c1: isTensorLike(b) ? 0 : b,
  });
  const inputs = floats;
  return record(out, "where", inputs, [cond], (g, [sc], needs) => {
    const grads: (Tensor | null)[] = [];
    if (isTensorLike(a)) {
      grads.push(
        needs[0]
          ? reduced(elementwise("where_da", "select(0.0, a, b != 0.0)", [g, sc], { out: g.dtype }), a.shape)
          : null,
      );
    }
    if (isTensorLike(b)) {
      grads.push(
        needs[grads.length]
          ? reduced(elementwise("where_db", "select(a, 0.0, b != 0.0)", [g, sc], { out: g.dtype }), b.shape)
          : null,
      );
    }
    return grads;
  });
}

/**
 * Converts to `dtype` (f32 ↔ f16 rounds to nearest; float → int truncates toward zero). Differentiable between
 * float dtypes.
 *
 * @example
 * ```ts
 * const h = cast(x, "f16");
 * ```
 */
export function cast(x: Tensor, dtype: DType): Tensor {
  const intOut = dtype === "i32" || dtype === "u32";
  const intIn = x.dtype === "i32" || x.dtype === "u32";
  const out = intOut && intIn
    ? elementwise("cast", "a", [x], { out: dtype, compute: dtype })
    : elementwise("cast", intOut ? `${dtype}(a)` : "a", [x], { out: dtype, compute: intOut ? dtype : "f32" });
  if (!isFloat(dtype) || !isFloat(x.dtype)) return out;
  return record(out, "cast", [x], [], (g) => [g.dtype === x.dtype ? g.detach() : cast(g, x.dtype)]);
}

/** Scales a tensor by a constant without recording a gradient (used inside backward rules). @example `scaled(g, 0.5)` */
export function scaled(x: Tensor, s: number): Tensor {
  return elementwise("scale", "a * p.c0", [x], { out: x.dtype, c0: s });
}
