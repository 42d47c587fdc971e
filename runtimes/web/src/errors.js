/** The one user-facing error of the runner: its message names what is wrong and what to do. */
export class RunError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "RunError";
  }
}
