if __name__ == "__main__":
    # Guarded: the load generator's spawned processes re-import this module as __mp_main__.
    from bench.run import main

    main()
