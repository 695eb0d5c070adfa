# Plots and Table 1 from all evaluation results; both cheap, so they run on the submitting node.


localrules:
    plot,
    table,
    longbench_table,


rule plot:
    input:
        evals=get_eval_files,
    output:
        plots=report(
            get_plot_files(None), caption="../report/plots.rst", category="Figures"
        ),
    log:
        f"{RESULTS}/logs/plot/plots.log",
    benchmark:
        f"{RESULTS}/benchmarks/plot/plots.tsv"
    conda:
        "../../envs/fox.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        configfiles=get_configfiles,
        out=get_plot_dir,
    shell:
        "fox plot --config {params.configfiles} --in {input.evals} --out {params.out} > {log} 2>&1"


rule table:
    input:
        # the table closes the pipeline: asking for table1.csv also makes the plots and each run's config.json
        # (`fox train --config` takes it); the averaged models are inputs too, so that whenever the table is
        # rebuilt a missing one (its average job failed, or it was deleted) is made again with its evaluation
        evals=get_eval_files,
        plots=get_plot_files,
        configs=get_run_config_files,
        models=get_averaged_files,
    output:
        csv=report(
            f"{RESULTS}/table1.csv", caption="../report/table1.rst", category="Table 1"
        ),
        md=f"{RESULTS}/table1.md",
    log:
        f"{RESULTS}/logs/table/table1.log",
    benchmark:
        f"{RESULTS}/benchmarks/table/table1.tsv"
    conda:
        "../../envs/fox.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        configfiles=get_configfiles,
    shell:
        "fox table --config {params.configfiles} --in {input.evals} --out {output.csv} > {log} 2>&1"


rule longbench_table:
    input:
        evals=get_longbench_files,
    output:
        csv=f"{RESULTS}/longbench.csv",
        md=f"{RESULTS}/longbench.md",
        plot=f"{RESULTS}/plots/longbench.png",
    log:
        f"{RESULTS}/logs/longbench_table/longbench.log",
    benchmark:
        f"{RESULTS}/benchmarks/longbench_table/longbench.tsv"
    conda:
        "../../envs/fox.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        configfiles=get_configfiles,
    shell:
        "fox longbench-table --config {params.configfiles} --in {input.evals} --out {output.csv} "
        "--plot {output.plot} > {log} 2>&1"
