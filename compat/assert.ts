/**
 * A stand-in for the subset of `@std/assert` this project uses, built on `node:assert/strict`.
 *
 * JSR is not reachable from our build machines, so `deno.json` maps `@std/assert` here. Switching to the real
 * package is the one-line change `"@std/assert": "jsr:@std/assert@^1"` in `deno.json`: every name below has the
 * same signature as its `@std/assert` namesake.
 *
 * @example
 * ```ts
 * import { assertAlmostEquals } from "@std/assert";
 * assertAlmostEquals(0.1 + 0.2, 0.3, 1e-12);
 * ```
 * @module
 */
import nodeAssert from "node:assert/strict";

/** Raised by every assertion here, like `@std/assert`'s `AssertionError`. */
export class AssertionError extends Error {
  /** @param message what failed */
  constructor(message: string) {
    super(message);
    this.name = "AssertionError";
  }
}

function fail(message: string | undefined, fallback: string): never {
  throw new AssertionError(message ?? fallback);
}

/** Asserts that `expr` is truthy. */
export function assert(expr: unknown, msg?: string): asserts expr {
  if (!expr) fail(msg, "Expected expression to be true");
}

/** Asserts deep equality (structural, strict). */
export function assertEquals<T>(actual: T, expected: T, msg?: string): void {
  try {
    nodeAssert.deepStrictEqual(actual, expected);
  } catch (e) {
    fail(msg ? `${msg}\n${(e as Error).message}` : undefined, (e as Error).message);
  }
}

/** Asserts deep inequality. */
export function assertNotEquals<T>(actual: T, expected: T, msg?: string): void {
  try {
    nodeAssert.notDeepStrictEqual(actual, expected);
  } catch (e) {
    fail(msg, (e as Error).message);
  }
}

/** Asserts `actual === expected`. */
export function assertStrictEquals<T>(actual: unknown, expected: T, msg?: string): asserts actual is T {
  if (!Object.is(actual, expected)) fail(msg, `Values are not strictly equal: ${actual} !== ${expected}`);
}

/** Asserts `|actual - expected| <= tolerance` (default 1e-7, as in `@std/assert`). */
export function assertAlmostEquals(actual: number, expected: number, tolerance = 1e-7, msg?: string): void {
  if (Object.is(actual, expected)) return;
  const delta = Math.abs(expected - actual);
  if (!(delta <= tolerance)) {
    fail(
      msg,
      `Expected actual: "${actual}" to be close to "${expected}": delta "${delta}" is greater than "${tolerance}"`,
    );
  }
}

/** Asserts `actual > expected`. */
export function assertGreater<T>(actual: T, expected: T, msg?: string): void {
  if (!(actual > expected)) fail(msg, `Expect ${actual} > ${expected}`);
}

/** Asserts `actual < expected`. */
export function assertLess<T>(actual: T, expected: T, msg?: string): void {
  if (!(actual < expected)) fail(msg, `Expect ${actual} < ${expected}`);
}

/** Asserts `actual` contains the substring `expected`. */
export function assertStringIncludes(actual: string, expected: string, msg?: string): void {
  if (!actual.includes(expected)) fail(msg, `Expected actual: "${actual}" to contain: "${expected}".`);
}

/** Asserts `actual` matches `expected`. */
export function assertMatch(actual: string, expected: RegExp, msg?: string): void {
  if (!expected.test(actual)) fail(msg, `Expected actual: "${actual}" to match: "${expected}".`);
}

// deno-lint-ignore no-explicit-any
type ErrorClass<E extends Error> = new (...args: any[]) => E;

function checkError<E extends Error>(
  err: unknown,
  ErrorClass?: ErrorClass<E>,
  msgIncludes?: string,
  msg?: string,
): E {
  if (ErrorClass && !(err instanceof ErrorClass)) {
    fail(msg, `Expected error to be instance of "${ErrorClass.name}", but was "${(err as Error)?.name}": ${err}`);
  }
  if (msgIncludes !== undefined && !String((err as Error)?.message).includes(msgIncludes)) {
    fail(msg, `Expected error message to include "${msgIncludes}", but got "${(err as Error)?.message}".`);
  }
  return err as E;
}

/** Asserts that `fn` throws; returns the error. Optionally checks its class and that its message includes a text. */
export function assertThrows<E extends Error = Error>(
  fn: () => unknown,
  ErrorClass?: ErrorClass<E>,
  msgIncludes?: string,
  msg?: string,
): E {
  try {
    fn();
  } catch (err) {
    return checkError(err, ErrorClass, msgIncludes, msg);
  }
  fail(msg, "Expected function to throw.");
}

/** Asserts that the promise returned by `fn` rejects; returns the error. */
export async function assertRejects<E extends Error = Error>(
  fn: () => PromiseLike<unknown>,
  ErrorClass?: ErrorClass<E>,
  msgIncludes?: string,
  msg?: string,
): Promise<E> {
  try {
    await fn();
  } catch (err) {
    return checkError(err, ErrorClass, msgIncludes, msg);
  }
  fail(msg, "Expected function to reject.");
}
