"""Running sweeps: sweep files, measuring one point, the executors (serial, Ray), the resumable runner
(:mod:`.sweep`), and saving compressed models (:mod:`.saving`)."""
